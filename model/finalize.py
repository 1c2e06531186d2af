"""Steps after training that change a bundle's card, not its weights.

Temperature scaling on the validation split (:func:`calibrate_bundle`) and the
applicability gate fitted on frontal chest radiographs and thresholded on held-out ones
(:func:`fit_bundle_gate`). Both keep the weights and their sha256; both are recorded in
the card with the data they were measured on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model.applicability import (
    DEFAULT_MARGIN,
    DEFAULT_ORIENTATION_SLACK,
    DEFAULT_SHRINKAGE,
    GATE_FILE,
    LAYOUT_GRID,
    METHOD,
    fit_gate,
    save_gate,
)
from model.bundle import (
    CARD_FILE,
    WEIGHTS_FILE,
    Bundle,
    BundleError,
    file_sha256,
    load_bundle,
    read_card,
    write_card,
)
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


def _gate_rows(clf: Classifier, records: Sequence[LabeledImage]) -> npt.NDArray[np.float32]:
    """Return the gate rows (features, layout) of the images (JPEG rendition)."""
    tensors = [preprocess(*load_image_file(r.path), clf.spec) for r in records]
    return clf.features(tensors)


def gate_part(patient_id: str) -> str:
    """Return ``fit`` (50 %), ``calibration`` (20 %) or ``held-out`` (30 %) for a patient.

    A fixed hash of the patient id, so the extra data's split is stable across runs.

    Parameters
    ----------
    patient_id
        Patient identifier of a labels.csv row.
    """
    bucket = int(hashlib.sha256(f"gate:{patient_id}".encode()).hexdigest(), 16) % 100
    return "fit" if bucket < 50 else ("calibration" if bucket < 70 else "held-out")


def split_extra(records: Sequence[LabeledImage]) -> dict[str, list[LabeledImage]]:
    """Split extra frontal radiographs by patient with :func:`gate_part`.

    Parameters
    ----------
    records
        The extra data set's images.
    """
    parts: dict[str, list[LabeledImage]] = {"fit": [], "calibration": [], "held-out": []}
    for rec in records:
        parts[gate_part(rec.patient_id)].append(rec)
    return parts


def portable(path: Path | str) -> str:
    """Return ``path`` as a card records it (never one machine's absolute path).

    Relative paths are kept as given; absolute ones become relative to the working
    directory.

    Parameters
    ----------
    path
        A data location.
    """
    text = str(path)
    return os.path.relpath(text) if os.path.isabs(text) else text


def load_for_gate_fitting(path: Path) -> Bundle:
    """Load a bundle whose gate is about to be replaced, even if the gate file is unreadable.

    A gate file of an older format must not block fitting its successor: the weights
    and the card are loaded (and verified) without it; nothing on disk changes.

    Parameters
    ----------
    path
        Bundle folder.
    """
    try:
        return load_bundle(path)
    except BundleError:
        card = read_card(path)
        if not card.applicability:
            raise
    with tempfile.TemporaryDirectory(prefix="radflag-gate-") as tmp:
        staging = Path(tmp)
        (staging / WEIGHTS_FILE).symlink_to((Path(path) / WEIGHTS_FILE).resolve())
        ungated = card.model_copy(update={"applicability": {}})
        (staging / CARD_FILE).write_text(ungated.to_json(), encoding="utf-8")
        loaded = load_bundle(staging)
    return dataclasses.replace(loaded, path=Path(path), card=card)


def fit_bundle_gate(
    bundle: Bundle,
    splits: dict[str, list[LabeledImage]],
    source: str,
    extra: list[LabeledImage] | None = None,
    extra_source: str = "",
    margin: float = DEFAULT_MARGIN,
) -> Bundle:
    """Fit the applicability gate and record its false-rejection rates in the card.

    Fit set: the training split (and the extra data's ``fit`` patients); thresholds: the
    largest distance among calibration images (validation split and the extra data's
    ``calibration`` patients) times ``1 + margin``; measured on the held-out test split
    and the extra data's ``held-out`` patients. No non-chest image is used.

    Parameters
    ----------
    bundle
        The bundle.
    splits
        ``train``, ``validation`` and ``test`` patient-level splits of the training data.
    source
        Name or relative path of the training data, for the card.
    extra
        Frontal chest radiographs of other patients (e.g. adults), or None.
    extra_source
        Name or relative path of ``extra``, for the card.
    margin
        Relative threshold margin.
    """
    clf = Classifier(bundle, batch_size=64)
    parts = split_extra(extra or [])
    rows = {name: _gate_rows(clf, recs) for name, recs in splits.items()}
    extra_rows = {name: _gate_rows(clf, recs) for name, recs in parts.items() if recs}
    fit_rows = np.concatenate(
        [rows["train"], *(extra_rows[k] for k in ("fit",) if k in extra_rows)]
    )
    cal_rows = np.concatenate(
        [rows["validation"], *(extra_rows[k] for k in ("calibration",) if k in extra_rows)]
    )
    gate = fit_gate(fit_rows, cal_rows, margin=margin)
    path = bundle.path / GATE_FILE
    save_gate(path, gate)
    measured = {"validation": rows["validation"], "test": rows["test"]}
    measured.update({f"extra {k}": v for k, v in extra_rows.items() if k != "fit"})
    frr: dict[str, Any] = {}
    for name, part_rows in measured.items():
        scores = gate.scores(part_rows)
        frr[name] = {
            "n": len(part_rows),
            "false_rejection_rate": float((gate.distances(part_rows) > 1.0).mean()),
            **{f"by_{k}": float((v > 1.0).mean()) for k, v in scores.items()},
        }
    n_extra = {k: len(v) for k, v in parts.items()}
    section = {
        "method": METHOD,
        "file": GATE_FILE,
        "sha256": file_sha256(path),
        "feature_dim": gate.feature_dim,
        "layout_grid": LAYOUT_GRID,
        "shrinkage": DEFAULT_SHRINKAGE,
        "margin": margin,
        "feature_threshold": gate.features.threshold,
        "layout_threshold": gate.layout.threshold,
        "orientation_slack": gate.orientation_slack,
        "threshold_rule": (
            f"largest distance of the calibration chest radiographs x {1 + margin:g}, per "
            "model; orientation: refused when the flipped / inverted layout is applicable "
            f"and its ratio < {DEFAULT_ORIENTATION_SLACK} x the smallest such quotient among "
            "calibration images times the image's own ratio. No non-chest image is used to "
            "fit or threshold the gate"
        ),
        "fitted_on": (
            f"train split of {source} ({len(splits['train'])} images)"
            + (
                f" + {n_extra['fit']} frontal images of {extra_source} ('fit' patients)"
                if extra
                else ""
            )
        ),
        "calibrated_on": (
            f"validation split of {source} ({len(splits['validation'])} images)"
            + (
                f" + {n_extra['calibration']} frontal images of {extra_source} "
                "('calibration' patients)"
                if extra
                else ""
            )
        ),
        "extra_split": (
            "patients by sha256('gate:' + patient_id) % 100: <50 fit, <70 calibration, "
            "else held-out"
        ),
        "false_rejection": frr,
        "note": (
            "validation and extra calibration FRR are 0 by construction (thresholds set there); "
            "test and extra held-out are held out"
        ),
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
    return portable(data if data is not None else str(bundle.card.training.get("data")))
