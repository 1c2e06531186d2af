"""Heatmap stage: the key image's Grad-CAM (batched across studies) and its display picture."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from daemon.stages.infer import ModelRunner
from daemon.stages.inputs import model_input, model_pixels, to_pixel_meta
from daemon.stages.prepare import PreparedImage, model_key, prepare_image
from daemon.stages.verdict import ModelVerdict
from model.preprocess import crop_box, to_display


@dataclass(frozen=True)
class HeatmapPicture:
    """What the heatmap SC shows: the source as a viewer shows it, and the heatmap on it."""

    display: npt.NDArray[np.uint8]
    heatmap: npt.NDArray[np.float32]


def key_image(verdict: ModelVerdict, kept: Mapping[str, PreparedImage]) -> PreparedImage:
    """Return the verdict's key image decoded: the kept one, else decoded again."""
    sel = verdict.key()
    have = kept.get(sel.uid)
    if have is not None and have.decoded is not None and model_key(verdict.loaded) in have.inputs:
        return have
    return prepare_image(sel, [verdict.loaded], keep=True)


def heatmap_picture(
    verdict: ModelVerdict, key: PreparedImage, runner: ModelRunner
) -> HeatmapPicture:
    """Map the key image's Grad-CAM onto the source and render the source for display.

    The Grad-CAM is the one the classify pass computed (``verdict.cams``); without one it
    is computed through the heatmap batcher.

    Raises
    ------
    ValueError
        When ``key`` was prepared without keeping its decoded image.
    """
    image = key.decoded
    if image is None:
        raise ValueError("the key image was not kept decoded")
    classifier = verdict.loaded.classifier
    pixels, _ = model_input(image)
    cam = verdict.cams.get(key.selected.uid)
    if cam is None:
        _, cam = runner.heatmap.submit(key.inputs[model_key(verdict.loaded)]).result()
    shape = (int(pixels.shape[0]), int(pixels.shape[1]))
    heatmap = classifier.heatmap_on_source(cam, shape, crop_box(pixels, classifier.spec))
    display = to_display(model_pixels(image), to_pixel_meta(image), classifier.spec)
    return HeatmapPicture(np.asarray(display, dtype=np.uint8), np.asarray(heatmap, np.float32))
