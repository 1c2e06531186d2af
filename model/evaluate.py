"""Evaluation of a bundle on a labelled image collection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model.bundle import Bundle
from model.data import read_dataset
from model.infer import Classifier
from model.metrics import binary_metrics, bootstrap_ci
from model.preprocess import load_image_file, preprocess

logger = logging.getLogger(__name__)


def evaluate(
    bundle: Bundle,
    labels: Path,
    batch_size: int = 32,
    bootstrap: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Classify every image of a labelled set and compute metrics at the card threshold.

    Parameters
    ----------
    bundle
        Loaded bundle.
    labels
        ``labels.csv`` (``filename,label,patient_id``) or dataset folder.
    batch_size
        Forward batch size.
    bootstrap
        Number of bootstrap resamples for 95 % CIs (0 disables).
    progress
        Show a tqdm bar.

    Returns
    -------
    dict
        Keys include n, accuracy, auc, sensitivity, specificity, ppv, npv, f1, threshold,
        confusion_matrix, ci95_bootstrap, unreadable.

    Raises
    ------
    ValueError
        When labels are not the bundle's classes or no image is readable.
    """
    records = read_dataset(labels)
    card = bundle.card
    unknown = sorted({r.label for r in records} - set(card.classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the bundle classes {card.classes}")
    clf = Classifier(bundle, batch_size=batch_size)
    spec = card.preprocess_spec
    tensors, truth, unreadable = [], [], []
    for rec in tqdm(records, desc="evaluate", disable=not progress, mininterval=5):
        try:
            pixels, meta = load_image_file(rec.path)
            tensors.append(preprocess(pixels, meta, spec))
            truth.append(rec.label == card.positive_class)
        except (ValueError, OSError) as exc:
            unreadable.append(f"{rec.path}: {exc}")
            logger.warning("unreadable image", extra={"path": str(rec.path), "error": str(exc)})
    if not tensors:
        raise ValueError(f"no readable images in {labels}")
    probs = clf.predict(tensors)
    y = np.array(truth, dtype=bool)
    result: dict[str, Any] = binary_metrics(y, probs, card.threshold)
    if bootstrap > 0:
        result["ci95_bootstrap"] = bootstrap_ci(y, probs, card.threshold, n_resamples=bootstrap)
    result["unreadable"] = unreadable
    result["model"] = {
        "name": card.name,
        "version": card.version,
        "weights_sha256": card.weights_sha256,
    }
    result["labels"] = str(labels)
    return result
