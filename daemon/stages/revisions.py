"""Where a new result stands among the study's earlier results of its model (revisions)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from db.results import PriorRevision
from dicom_io.revisions import (
    ObjectRef,
    ResultContent,
    add_algorithm_equipment,
    set_predecessor,
    set_revision_number,
)
from dicom_io.sr import AlgorithmInfo, FindingResult, SRStorageClass, model_identity


def result_content(
    per_image: dict[str, float], finding: FindingResult, threshold: float
) -> ResultContent:
    """Return what a result states: its source images and values (names its UIDs)."""
    return ResultContent(
        frozenset(per_image),
        {
            "finding": f"{finding.code_scheme}:{finding.code_value}",
            "probability": float(finding.probability),
            "present": bool(finding.present),
            "threshold": float(threshold),
        },
    )


@dataclass(frozen=True)
class Revision:
    """Where a newly computed result stands among the study's earlier results of its model."""

    number: int
    predecessor: ObjectRef | None
    """The SR the new SR replaces (its Predecessor Documents Sequence, PS3.3 C.17.2)."""
    replaces: PriorRevision | None
    """The earlier revision this one supersedes; None when new or unchanged."""


def next_revision(prior: PriorRevision | None, study_uid: str, sr_sop_uid: str) -> Revision:
    """Return the new result's revision: unchanged content keeps the prior one, else + 1."""
    if prior is None or not prior.sr_sop_instance_uid or not prior.sr_series_instance_uid:
        return Revision(1, None, None)
    if prior.sr_sop_instance_uid == sr_sop_uid:  # same content, same object
        earlier = None
        if prior.predecessor_sop_instance_uid and prior.predecessor_series_instance_uid:
            earlier = ObjectRef(
                study_uid,
                prior.predecessor_series_instance_uid,
                SRStorageClass.COMPREHENSIVE_3D.value,
                prior.predecessor_sop_instance_uid,
            )
        return Revision(prior.revision, earlier, None)
    predecessor = ObjectRef(
        study_uid,
        prior.sr_series_instance_uid,
        SRStorageClass.COMPREHENSIVE_3D.value,
        prior.sr_sop_instance_uid,
    )
    return Revision(prior.revision + 1, predecessor, prior)


def mark_revision(ds: Dataset, algorithm: AlgorithmInfo, revision: Revision) -> None:
    """Add the algorithm's Contributing Equipment, the revision number and (SR) predecessor."""
    add_algorithm_equipment(ds, model_identity(algorithm), algorithm.manufacturer)
    set_revision_number(ds, revision.number)
    if revision.predecessor is not None and "ContentSequence" in ds:
        set_predecessor(ds, revision.predecessor)
