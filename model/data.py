"""Labelled image collections and the patient-level split."""

from __future__ import annotations

import csv
import logging
import random
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


@dataclass(frozen=True)
class LabeledImage:
    """One labelled image file."""

    path: Path
    label: str
    patient_id: str


def read_labels_csv(
    csv_path: Path, exclude: Mapping[str, Collection[str]] | None = None
) -> list[LabeledImage]:
    """Read ``filename,label,patient_id`` rows; filenames are relative to the csv folder.

    Parameters
    ----------
    csv_path
        The ``labels.csv`` file. Extra columns are ignored unless named in ``exclude``; an
        empty ``patient_id`` makes the image its own patient.
    exclude
        Rows whose column ``key`` holds one of the given values are left out (e.g.
        ``{"view": ["L"]}`` keeps frontal views only); the count is logged.

    Raises
    ------
    ValueError
        When required columns are missing or a row is incomplete.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    records: list[LabeledImage] = []
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"filename", "label", *(exclude or {})} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)}")
        dropped = 0
        for line, row in enumerate(reader, start=2):
            if any((row.get(col) or "").strip() in vals for col, vals in (exclude or {}).items()):
                dropped += 1
                continue
            filename = (row.get("filename") or "").strip()
            label = (row.get("label") or "").strip()
            if not filename or not label:
                raise ValueError(f"{csv_path}:{line}: empty filename or label")
            patient = (row.get("patient_id") or "").strip() or f"file:{filename}"
            records.append(LabeledImage(base / filename, label, patient))
    if exclude:
        logger.info(
            "excluded rows by column value",
            extra={"csv": str(csv_path), "excluded": dropped, "kept": len(records)},
        )
    return records


def read_class_folders(root: Path) -> list[LabeledImage]:
    """Read ``root/<class>/*.{jpg,jpeg,png}``; every image is its own patient.

    Parameters
    ----------
    root
        Folder with one sub-folder per class.
    """
    records = [
        LabeledImage(p, sub.name.lower(), f"file:{sub.name}/{p.name}")
        for sub in sorted(Path(root).iterdir())
        if sub.is_dir()
        for p in sorted(sub.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return records


def read_dataset(
    data: Path, exclude: Mapping[str, Collection[str]] | None = None
) -> list[LabeledImage]:
    """Read a dataset given as a ``labels.csv`` file, a folder holding one, or class folders.

    Parameters
    ----------
    data
        Path to the csv or the dataset folder.
    exclude
        Column -> values to leave out (csv datasets only; see :func:`read_labels_csv`).

    Raises
    ------
    ValueError
        When nothing usable is found.
    """
    data = Path(data)
    if data.is_file():
        records = read_labels_csv(data, exclude)
    elif (data / "labels.csv").is_file():
        records = read_labels_csv(data / "labels.csv", exclude)
    elif data.is_dir():
        if exclude:
            raise ValueError(f"{data}: column exclusions need a labels.csv dataset")
        records = read_class_folders(data)
    else:
        raise ValueError(f"dataset not found: {data}")
    if not records:
        raise ValueError(f"no labelled images in {data}")
    return records


@dataclass(frozen=True)
class PatientSplit:
    """Disjoint patient-level partitions of a dataset."""

    train: list[LabeledImage]
    val: list[LabeledImage]
    test: list[LabeledImage]

    def describe(self, positive_class: str) -> dict[str, dict[str, int]]:
        """Count patients and images per class for each partition.

        Parameters
        ----------
        positive_class
            Name of the positive class.
        """
        out: dict[str, dict[str, int]] = {}
        for name, part in (("train", self.train), ("validation", self.val), ("test", self.test)):
            out[name] = {
                "patients": len({r.patient_id for r in part}),
                "images": len(part),
                "positive_images": sum(r.label == positive_class for r in part),
                "negative_images": sum(r.label != positive_class for r in part),
            }
        return out


def patient_split(
    records: list[LabeledImage],
    val_fraction: float,
    seed: int,
    positive_class: str,
    test_fraction: float = 0.0,
) -> PatientSplit:
    """Split by patient, stratified by patient label (positive if any image is positive).

    Parameters
    ----------
    records
        All labelled images.
    val_fraction, test_fraction
        Fractions of patients (per stratum) for validation and test.
    seed
        Seed of the shuffle (the split is reproducible).
    positive_class
        Name of the positive class.

    Raises
    ------
    ValueError
        On invalid fractions.
    """
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"invalid fractions val={val_fraction} test={test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must be < 1")
    by_patient: dict[str, list[LabeledImage]] = defaultdict(list)
    for rec in records:
        by_patient[rec.patient_id].append(rec)
    strata: dict[bool, list[str]] = {True: [], False: []}
    for pid in sorted(by_patient):
        strata[any(r.label == positive_class for r in by_patient[pid])].append(pid)
    rng = random.Random(seed)
    parts: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for key in (False, True):
        pids = strata[key]
        rng.shuffle(pids)
        n_val = round(len(pids) * val_fraction)
        n_test = round(len(pids) * test_fraction)
        parts["val"].update(pids[:n_val])
        parts["test"].update(pids[n_val : n_val + n_test])
        parts["train"].update(pids[n_val + n_test :])
    if (
        parts["train"] & parts["val"]
        or parts["train"] & parts["test"]
        or parts["val"] & parts["test"]
    ):
        raise AssertionError("patient split overlap")  # defensive: cannot happen by construction
    split = PatientSplit(
        train=[r for r in records if r.patient_id in parts["train"]],
        val=[r for r in records if r.patient_id in parts["val"]],
        test=[r for r in records if r.patient_id in parts["test"]],
    )
    return split
