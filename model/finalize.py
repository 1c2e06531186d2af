"""Steps after training that change a bundle's card, not its weights.

Temperature scaling on the validation split (:func:`calibrate_bundle`) and the
applicability gate fitted on the training split and thresholded on validation
(:func:`fit_bundle_gate`). Both keep the weights and their sha256; both are recorded in
the card with the data they were measured on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model.applicability import (
    DEFAULT_QUANTILE,
    DEFAULT_SHRINKAGE,
    GATE_FILE,
    METHOD,
    fit_gate,
    mediastinum_contrast,
    save_gate,
)
from model.bundle import Bundle, file_sha256, write_card
from model.calibration import calibration_report, fit_temperature, move_threshold, to_logits
from model.data import LabeledImage
from model.evaluate import score_records
from model.infer import Classifier
from model.preprocess import load_image_file, preprocess

logger = logging.getLogger(__name__)


def calibrate_bundle(bundle: Bundle, val_records: list[LabeledImage], source: str) -> Bundle:
    """Fit the card's temperature and bias on validation images; keep the decisions.

    The threshold is moved with the calibration so every decision stays the same; the
    card records ECE and NLL before and after.

    Parameters
    ----------
    bundle
        Bundle to calibrate (its current temperature is undone first).
    val_records
        The validation split.
    source
        Description of ``val_records`` for the card.
    """
    card = bundle.card
    truth, probs, _ = score_records(bundle, val_records, progress=False)
    logits = to_logits(probs, card.temperature, card.logit_bias)
    temperature, bias = fit_temperature(truth, logits)
    report = calibration_report(truth, logits, temperature, bias)
    threshold = move_threshold(
        card.threshold, (card.temperature, card.logit_bias), (temperature, bias)
    )
    report.update(
        {
            "data": source,
            "threshold_before": card.threshold,
            "threshold_after": threshold,
            "note": "decisions unchanged: the threshold moves with the calibration",
        }
    )
    training = {**card.training, "calibration": report}
    new = card.model_copy(
        update={
            "temperature": temperature,
            "logit_bias": bias,
            "threshold": threshold,
            "training": training,
        }
    )
    logger.info("calibrated", extra={"temperature": temperature})
    return write_card(bundle.path, new)


def _features(
    clf: Classifier, records: Sequence[LabeledImage]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """Return pooled features and mediastinum contrasts of the images (JPEG rendition)."""
    spec = clf.spec
    tensors = [preprocess(*load_image_file(r.path), spec) for r in records]
    return clf.features(tensors), mediastinum_contrast(np.stack(tensors))


def fit_bundle_gate(
    bundle: Bundle,
    train: list[LabeledImage],
    val: list[LabeledImage],
    test: list[LabeledImage],
    source: str,
    quantile: float = DEFAULT_QUANTILE,
) -> Bundle:
    """Fit the applicability gate and record its false-rejection rates in the card.

    Parameters
    ----------
    bundle
        The bundle.
    train, val, test
        Patient-level splits of the training data (JPEG rendition).
    source
        Description of the data for the card.
    quantile
        Validation quantile used as the distance threshold.
    """
    clf = Classifier(bundle, batch_size=64)
    (f_train, _), (f_val, c_val), (f_test, c_test) = (
        _features(clf, part) for part in (train, val, test)
    )
    gate = fit_gate(f_train, f_val, quantile=quantile, val_contrasts=c_val)
    path = bundle.path / GATE_FILE
    save_gate(path, gate)
    frr: dict[str, Any] = {}
    for name, feats, contrast in (("validation", f_val, c_val), ("test", f_test, c_test)):
        far = gate.distances(feats) > gate.threshold
        flat = contrast < gate.contrast_threshold
        frr[name] = {
            "n": int(len(far)),
            "false_rejection_rate": float((far | flat).mean()),
            "by_feature_distance": float(far.mean()),
            "by_mediastinum_contrast": float(flat.mean()),
        }
    section = {
        "method": METHOD + "; and the mediastinum contrast of the model input",
        "file": GATE_FILE,
        "sha256": file_sha256(path),
        "feature_dim": int(gate.mean.size),
        "shrinkage": DEFAULT_SHRINKAGE,
        "threshold": gate.threshold,
        "contrast_threshold": gate.contrast_threshold,
        "threshold_rule": (
            f"{quantile:.3f} quantile of validation distances and "
            f"{1 - quantile:.3f} quantile of validation mediastinum contrasts"
        ),
        "fitted_on": f"train split of {source} ({len(train)} images)",
        "false_rejection": frr,
        "note": "validation FRR is optimistic (threshold chosen there); test is held out",
    }
    return write_card(bundle.path, bundle.card.model_copy(update={"applicability": section}))


def record_renditions(bundle: Bundle, split: str, table: list[dict[str, Any]]) -> Bundle:
    """Store a rendition table in the card's metrics under ``renditions.<split>``.

    Parameters
    ----------
    bundle
        The bundle.
    split
        Which images (e.g. ``validation``).
    table
        :meth:`model.renditions.RenditionRow.to_dict` rows.
    """
    metrics = dict(bundle.card.metrics)
    renditions = dict(metrics.get("renditions", {}))
    renditions[split] = table
    metrics["renditions"] = renditions
    return write_card(bundle.path, bundle.card.model_copy(update={"metrics": metrics}))


def default_data(bundle: Bundle, data: Path | None) -> str:
    """Return a description of the bundle's training data location.

    Parameters
    ----------
    bundle
        The bundle.
    data
        Override of the data location.
    """
    return str(data if data is not None else bundle.card.training.get("data"))
