"""IHE IOCM rejection notes: a Key Object Selection Document that rejects superseded results.

When a study is re-processed and its result changes, the new SR names its predecessor
(PS3.3 C.17.2). A destination configured with ``supersede = "iocm_reject"`` also receives a
rejection note for the objects the new revision replaces: a Key Object Selection Document
(PS3.3 A.59, TID 2010, built with :class:`highdicom.ko.KeyObjectSelectionDocument`) whose
document title is (DCM 113001) "Rejected for Quality Reasons" (CID 7011 "Rejected for Quality
Reasons", IHE RAD TF-3 4.66.4.1.3.1 "Rejection Note") and which references every rejected
instance, so archives that implement IHE Imaging Object Change Management (IOCM; dcm4chee,
many enterprise PACS) hide them. The KOS belongs to the same study and patient as the
rejected objects; its UIDs derive from the rejected instances, so a re-send keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from dicom_io.revisions import ModelIdentity, _uid, add_algorithm_equipment

REJECTED_FOR_QUALITY_REASONS = CodedConcept("113001", "DCM", "Rejected for Quality Reasons")
"""IOCM rejection note title (CID 7010 / IHE RAD TF-3 4.66.4.1.3.1)."""

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
"""Key Object Selection Document Storage (PS3.4 B.5)."""


def rejection_note_uids(rejected: Sequence[Dataset]) -> tuple[str, str]:
    """Return ``(series_uid, sop_uid)`` of the rejection note of ``rejected`` (deterministic)."""
    if not rejected:
        raise ValueError("rejected must name at least one instance")
    uids = sorted(str(ds.SOPInstanceUID) for ds in rejected)
    study = str(rejected[0].StudyInstanceUID)
    return _uid("radflag-kos", study, "series"), _uid("radflag-kos", study, *uids)


def build_rejection_note(
    rejected: Sequence[Dataset],
    model: ModelIdentity,
    manufacturer: str,
    *,
    series_number: int = 9903,
    institution_name: str | None = None,
) -> Dataset:
    """Build the IOCM rejection note (KOS) of ``rejected`` result objects.

    Parameters
    ----------
    rejected
        The superseded SR/SC objects as sent (headers suffice); one study, one patient.
    model
        The model whose new revision supersedes them (Contributing Equipment item).
    manufacturer
        Manufacturer of the algorithm.
    series_number, institution_name
        Series Number and optional Institution Name of the note.

    Returns
    -------
    Dataset
        A Key Object Selection Document (Explicit VR Little Endian) referencing each
        rejected instance (TID 2010 IMAGE/COMPOSITE items, Current Requested Procedure
        Evidence Sequence).

    Raises
    ------
    ValueError
        If ``rejected`` is empty or spans several studies.
    """
    if len({str(ds.StudyInstanceUID) for ds in rejected}) != 1:
        raise ValueError("rejected objects must belong to exactly one study")
    series_uid, sop_uid = rejection_note_uids(rejected)
    content = KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS,
        referenced_objects=list(rejected),
        description=f"superseded by a newer result of {model.name} {model.version}"[:1024],
    )
    kos = KeyObjectSelectionDocument(
        evidence=list(rejected),
        content=content,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution_name,
    )
    kos.SeriesDescription = "IOCM rejection note"
    add_algorithm_equipment(kos, model, manufacturer, institution_name=institution_name)
    return kos


def rejected_instances(kos: Dataset) -> list[str]:
    """Return the SOP Instance UIDs a rejection note references (its TID 2010 items)."""
    out: list[str] = []
    for item in kos.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            out.append(str(ref.ReferencedSOPInstanceUID))
    return out
