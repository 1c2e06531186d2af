"""Renditions of real training images: what the renderer makes, and why the model input
stays the same (squash geometry, image-range intensity, border crop) while the legacy
letterbox/VOI pipeline does not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from model.data import read_dataset
from model.pixels import PixelMeta
from model.preprocess import CropBox, PreprocessSpec, content_box, load_image_file, preprocess
from model.renditions import RENDITIONS, RenditionSpec, direct_reader, render
from tests.conftest import shared_path

SPEC = PreprocessSpec(input_size=96, channels=1)
LEGACY = PreprocessSpec(
    input_size=96, channels=1, geometry="letterbox", intensity="voi", crop_borders=False
)


@pytest.fixture(scope="module")
def kermany_images() -> list[np.ndarray]:
    """Four real training JPEGs (two per class), fixed by name order."""
    records = sorted(read_dataset(shared_path("cxr", "kermany-pneumonia-train")), key=str)
    picks = [r for r in records if r.label == "normal"][:2] + [
        r for r in records if r.label == "pneumonia"
    ][:2]
    return [load_image_file(r.path)[0] for r in picks]


@pytest.mark.parametrize("spec", RENDITIONS, ids=lambda s: s.name)
def test_render_encodes_what_the_spec_says(
    kermany_images: list[np.ndarray], spec: RenditionSpec
) -> None:
    image = kermany_images[0]
    r = render(image, spec)
    rows, cols = spec.shape or image.shape
    assert r.pixels.shape == (rows + 2 * spec.padding_px, cols + 2 * spec.padding_px)
    assert r.pixels.dtype == np.uint16 and int(r.pixels.max()) < 2**spec.bits_stored
    assert r.photometric == ("MONOCHROME1" if spec.monochrome1 else "MONOCHROME2")
    inner = r.pixels[
        spec.padding_px : spec.padding_px + rows, spec.padding_px : spec.padding_px + cols
    ].astype(np.float64)
    small = inner[:: max(1, rows // image.shape[0]), :: max(1, cols // image.shape[1])]
    ref = np.asarray(image, dtype=np.float64)
    if small.shape == ref.shape:
        corr = np.corrcoef(small.ravel(), ref.ravel())[0, 1]
        assert (corr < -0.99) if spec.monochrome1 else (corr > 0.99)
    if spec.window == "lut":
        assert r.voi_lut_descriptor is not None and r.voi_lut_data is not None
        assert r.voi_lut_descriptor[0] == len(r.voi_lut_data)
    elif spec.window != "none":
        assert r.window_width is not None and r.window_center is not None
    if spec.padding_px:
        assert r.pixel_padding_value == 0
        assert (r.pixels[: spec.padding_px] == 0).all()


def test_every_rendition_gives_the_training_input(kermany_images: list[np.ndarray]) -> None:
    for image in kermany_images:
        base = preprocess(image, PixelMeta(bits_stored=8), SPEC)
        for spec in RENDITIONS:
            pixels, meta = direct_reader(render(image, spec))
            diff = float(np.abs(preprocess(pixels, meta, SPEC) - base).mean())
            # normalised units (std 0.25): 0.03 is under 1 % of the grey range
            assert diff < 0.03, (spec.name, diff)


def test_legacy_pipeline_changes_the_input_for_hospital_renditions(
    kermany_images: list[np.ndarray],
) -> None:
    # the letterbox/VOI pipeline the issue reports: the same checks must see it fail
    image = kermany_images[2]
    base = preprocess(image, PixelMeta(bits_stored=8), LEGACY)
    worst = max(
        float(np.abs(preprocess(*direct_reader(render(image, s)), LEGACY) - base).mean())
        for s in RENDITIONS
    )
    assert worst > 0.3


def test_content_box_finds_the_image_inside_padding(kermany_images: list[np.ndarray]) -> None:
    image = kermany_images[1]
    stored = (image.astype(np.uint16) * 16 + 100).astype(np.uint16)
    for value in (0, 4095):
        padded = np.pad(stored, ((30, 10), (7, 50)), constant_values=value)
        box = content_box(padded)
        inner = content_box(stored)
        assert (box.top, box.left) == (30 + inner.top, 7 + inner.left)
        assert (box.bottom, box.right) == (30 + inner.bottom, 7 + inner.right)


def test_content_box_keeps_uniform_images_and_large_dark_regions() -> None:
    flat = np.full((50, 40), 7, dtype=np.uint16)
    assert content_box(flat) == CropBox(0, 50, 0, 40)
    half = np.zeros((100, 100), dtype=np.uint16)
    half[:, 60:] = 1000  # 60 % black columns: content, not a border (more than 45 %)
    assert content_box(half) == CropBox(0, 100, 0, 100)


def test_squash_fills_the_input_whatever_the_aspect_ratio() -> None:
    tall = np.zeros((300, 100), dtype=np.uint16)
    tall[:, :] = np.linspace(0, 4000, 300, dtype=np.uint16)[:, None]
    tall[140:160, :10] = 0  # a dark mark at the left edge of the middle rows
    out = preprocess(tall, PixelMeta(), SPEC)[0]
    assert out.shape == (96, 96)
    # rows of the source span the whole input height, columns the whole width
    assert out[0].mean() < out[-1].mean()
    assert out[48, :3].mean() < out[48, 50] - 1.0


def test_image_range_ignores_the_window_and_voi_keeps_it(kermany_images: list[np.ndarray]) -> None:
    image = kermany_images[3].astype(np.uint16) * 16
    narrow = PixelMeta(window_center=2000.0, window_width=600.0)
    none = PixelMeta()
    np.testing.assert_array_equal(preprocess(image, narrow, SPEC), preprocess(image, none, SPEC))
    assert np.abs(preprocess(image, narrow, LEGACY) - preprocess(image, none, LEGACY)).mean() > 0.2


def test_legacy_cards_keep_their_pipeline() -> None:
    old = PreprocessSpec.from_dict({"input_size": 160, "channels": 1})
    assert (old.geometry, old.intensity, old.crop_borders) == ("letterbox", "voi", False)
    new = PreprocessSpec.from_dict(SPEC.to_dict())
    assert new == SPEC and dataclasses.asdict(new)["geometry"] == "squash"
    with pytest.raises(ValueError, match="geometry"):
        PreprocessSpec(input_size=64, channels=1, geometry="crop")
    with pytest.raises(ValueError, match="intensity"):
        PreprocessSpec(input_size=64, channels=1, intensity="window")
