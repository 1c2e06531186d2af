"""Inference stage: one classify and one heatmap micro-batcher per model, shared by studies.

Every study in flight submits its preprocessed inputs to its models' batchers
(:class:`model.batcher.MicroBatcher`); batches mix studies, and each future is resolved with
its own image's prediction. When heatmap pictures are wanted, the classify batcher also
returns each image's raw Grad-CAM from the same forward pass (one backward through the head,
:meth:`model.infer.Classifier.classify_with_cams`); the heatmap batcher (a forward and a
backward over a batch of key images) is only the fallback for a key image without one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from daemon.models import LoadedModel
from daemon.stages.prepare import model_key
from model.batcher import BatcherConfig, MicroBatcher
from model.infer import ImagePrediction

Input = npt.NDArray[Any]
RawHeatmap = tuple[float, npt.NDArray[np.float32]]


class ModelRunner:
    """The classify and heatmap batchers of one warm model (threads started at once).

    Parameters
    ----------
    loaded
        The model.
    config
        Batch size, latency bound and queue bound of both batchers.
    with_cams
        Classify with each image's Grad-CAM (when heatmap pictures are built).
    """

    def __init__(self, loaded: LoadedModel, config: BatcherConfig, with_cams: bool = False) -> None:
        clf = loaded.classifier
        name = model_key(loaded)
        self.loaded = loaded
        classify = clf.classify_with_cams if with_cams else clf.classify_prepared
        self.classify: MicroBatcher[Input, ImagePrediction] = MicroBatcher(
            classify, config, name=f"radflag-infer-{name}"
        ).start()
        self.heatmap: MicroBatcher[Input, RawHeatmap] = MicroBatcher(
            clf.heatmaps_prepared, config, name=f"radflag-heatmap-{name}"
        ).start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Run what is queued, then stop both batchers."""
        first = self.classify.stop(timeout_s)
        return self.heatmap.stop(timeout_s) and first


def start_runners(
    models: list[LoadedModel], config: BatcherConfig, with_cams: bool = False
) -> dict[str, ModelRunner]:
    """Start one :class:`ModelRunner` per model, filed by card name."""
    return {model_key(m): ModelRunner(m, config, with_cams) for m in models}
