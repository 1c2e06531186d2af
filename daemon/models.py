"""Loading the configured model bundles once, at start-up, into warm classifiers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model.bundle import Bundle, default_bundle_path, load_bundle
from model.infer import Classifier, select_device

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A bundle and its warm classifier."""

    bundle: Bundle
    classifier: Classifier
    device: torch.device

    @property
    def modalities(self) -> frozenset[str]:
        """Modalities the model applies to (from its card)."""
        return frozenset(m.upper() for m in self.bundle.card.modalities)


def load_models(
    paths: list[Path], device: str, batch_size: int, torch_threads: int = 0
) -> list[LoadedModel]:
    """Load every bundle in ``paths`` (the shipped default when empty) onto ``device``.

    ``torch_threads`` > 0 sets PyTorch's intra-op threads for the process (CPU inference):
    on a host whose cores are busy with other work, fewer threads than cores avoid threads
    waiting on each other at every operation.

    Raises
    ------
    model.bundle.BundleError
        When a bundle is missing, malformed, or its weights do not match the card's sha256.
    """
    chosen = select_device(device)
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    loaded: list[LoadedModel] = []
    for path in paths or [default_bundle_path()]:
        bundle = load_bundle(path)
        classifier = Classifier(bundle, device=chosen, batch_size=batch_size)
        log.info(
            "model loaded",
            extra={
                "model": bundle.card.name,
                "version": bundle.card.version,
                "weights_sha256": bundle.card.weights_sha256,
                "device": str(chosen),
                "modalities": sorted(bundle.card.modalities),
            },
        )
        loaded.append(LoadedModel(bundle=bundle, classifier=classifier, device=chosen))
    return loaded
