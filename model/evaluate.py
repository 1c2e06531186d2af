"""Evaluation of a bundle on a labelled image collection."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from model.bundle import Bundle, ModelCard
from model.data import LabeledImage, patient_split, read_dataset
from model.infer import Classifier
from model.metrics import binary_metrics, bootstrap_ci, choose_threshold
from model.preprocess import load_image_file, preprocess

logger = logging.getLogger(__name__)

CI_KEYS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc")
SPLIT_NAMES = ("train", "validation", "test")


def card_split(card: ModelCard, split_name: str, data: Path | None = None) -> list[LabeledImage]:
    """Rebuild one partition of the patient-level split recorded in a card.

    Uses the card's training data (or ``data``), exclusions, limit, seed and fractions,
    i.e. the same code path as training, so ``test`` is the held-out test split.

    Parameters
    ----------
    card
        Model card of a bundle made by ``radflag model train``.
    split_name
        ``train``, ``validation`` or ``test``.
    data
        Dataset location when it moved since training.

    Raises
    ------
    ValueError
        When the card does not record a split or the partition is empty.
    """
    from model.train import stratified_limit  # noqa: PLC0415 - avoid a cycle at import time

    if split_name not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split_name!r}")
    settings = card.training.get("settings", {})
    source = data if data is not None else card.training.get("data")
    if not settings or source is None:
        raise ValueError(f"card of {card.name} records no training split")
    records = read_dataset(Path(source), settings.get("exclude") or None)
    if settings.get("limit") is not None:
        records = stratified_limit(records, int(settings["limit"]), int(settings["seed"]))
    split = patient_split(
        records,
        float(settings["val_fraction"]),
        int(settings["seed"]),
        card.positive_class,
        float(settings["test_fraction"]),
    )
    part = {"train": split.train, "validation": split.val, "test": split.test}[split_name]
    if not part:
        raise ValueError(f"the {split_name} split of {card.name} is empty")
    expected = card.training.get("split", {}).get(split_name, {}).get("images")
    if expected is not None and expected != len(part):
        raise ValueError(
            f"rebuilt {split_name} split has {len(part)} images, the card says {expected}: "
            "the data changed since training"
        )
    return part


def score_records(
    bundle: Bundle, records: list[LabeledImage], batch_size: int = 32, progress: bool = True
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64], list[str]]:
    """Return (truth, P(positive), unreadable) for labelled image files.

    Parameters
    ----------
    bundle
        Loaded bundle.
    records
        Labelled images (labels must be the bundle's classes).
    batch_size
        Forward batch size.
    progress
        Show a tqdm bar.

    Raises
    ------
    ValueError
        When labels are not the bundle's classes or no image is readable.
    """
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
        raise ValueError("no readable images")
    return np.array(truth, dtype=bool), clf.predict(tensors), unreadable


def evaluate(
    bundle: Bundle,
    labels: Path | list[LabeledImage],
    batch_size: int = 32,
    bootstrap: int = 1000,
    progress: bool = True,
    threshold: float | None = None,
    plots: Path | None = None,
    scores: tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64], list[str]] | None = None,
) -> dict[str, Any]:
    """Classify every image of a labelled set and compute metrics at the card threshold.

    Parameters
    ----------
    bundle
        Loaded bundle.
    labels
        ``labels.csv`` (``filename,label,patient_id``), dataset folder, or records.
    batch_size
        Forward batch size.
    bootstrap
        Number of bootstrap resamples for 95 % CIs (0 disables).
    progress
        Show a tqdm bar.
    threshold
        Operating threshold (default: the card's).
    plots
        Folder for ROC, precision-recall and calibration PNGs (none when ``None``).
    scores
        Output of :func:`score_records` for ``labels`` when already computed.

    Returns
    -------
    dict
        Keys include n, accuracy, auc, sensitivity, specificity, ppv, npv, f1, threshold,
        confusion_matrix, ci95_bootstrap, unreadable, plots.

    Raises
    ------
    ValueError
        When labels are not the bundle's classes or no image is readable.
    """
    records = read_dataset(labels) if isinstance(labels, Path) else labels
    y, probs, unreadable = (
        scores if scores is not None else score_records(bundle, records, batch_size, progress)
    )
    card = bundle.card
    operating = card.threshold if threshold is None else threshold
    result: dict[str, Any] = binary_metrics(y, probs, operating)
    if bootstrap > 0:
        result["ci95_bootstrap"] = bootstrap_ci(
            y, probs, operating, n_resamples=bootstrap, keys=CI_KEYS
        )
    result["unreadable"] = unreadable
    result["model"] = {
        "name": card.name,
        "version": card.version,
        "weights_sha256": card.weights_sha256,
    }
    result["labels"] = str(labels) if isinstance(labels, Path) else f"{len(records)} records"
    if plots is not None:
        from model.plots import write_plots  # noqa: PLC0415 - matplotlib only when asked

        title = f"{card.name} {card.version}"
        result["plots"] = [str(p) for p in write_plots(y, probs, operating, plots, title)]
    return result


def calibrate_threshold(
    y: npt.NDArray[np.bool_], probs: npt.NDArray[np.float64], target_sensitivity: float
) -> float:
    """Pick the operating threshold reaching ``target_sensitivity`` on a validation set.

    Parameters
    ----------
    y, probs
        Truth and P(positive) of the validation images.
    target_sensitivity
        Wanted sensitivity in (0, 1].

    Raises
    ------
    ValueError
        On a target outside (0, 1] or a set without both classes.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    if y.all() or not y.any():
        raise ValueError("a threshold needs positive and negative images")
    return choose_threshold(y, probs, target_sensitivity)


def threshold_change(
    card: ModelCard, new_threshold: float, target_sensitivity: float, source: str
) -> ModelCard:
    """Return ``card`` with a new threshold and the change recorded in ``training``.

    Parameters
    ----------
    card
        Current card.
    new_threshold
        The calibrated threshold.
    target_sensitivity
        The target it was chosen for.
    source
        Where the validation images came from.
    """
    changes = list(card.training.get("threshold_changes", []))
    changes.append(
        {
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "from": card.threshold,
            "to": new_threshold,
            "target_sensitivity": target_sensitivity,
            "validation_data": source,
            "rule": "highest threshold with sensitivity >= target, else Youden",
        }
    )
    return card.model_copy(
        update={
            "threshold": new_threshold,
            "training": {**card.training, "threshold_changes": changes},
        }
    )
