"""Inference stage: one classify and one heatmap micro-batcher per model, shared by studies.

Every study in flight submits its preprocessed inputs to its models' batchers
(:class:`model.batcher.MicroBatcher`); batches mix studies, and each future is resolved with
its own image's prediction. Heatmaps (Grad-CAM: one forward and one backward over a batch of
key images of several studies) go through a second batcher.
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
    """

    def __init__(self, loaded: LoadedModel, config: BatcherConfig) -> None:
        clf = loaded.classifier
        name = model_key(loaded)
        self.loaded = loaded
        self.classify: MicroBatcher[Input, ImagePrediction] = MicroBatcher(
            clf.classify_prepared, config, name=f"radflag-infer-{name}"
        ).start()
        self.heatmap: MicroBatcher[Input, RawHeatmap] = MicroBatcher(
            clf.heatmaps_prepared, config, name=f"radflag-heatmap-{name}"
        ).start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Run what is queued, then stop both batchers."""
        first = self.classify.stop(timeout_s)
        return self.heatmap.stop(timeout_s) and first


def start_runners(models: list[LoadedModel], config: BatcherConfig) -> dict[str, ModelRunner]:
    """Start one :class:`ModelRunner` per model, filed by card name."""
    return {model_key(m): ModelRunner(m, config) for m in models}
