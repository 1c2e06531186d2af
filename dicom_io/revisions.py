"""Result identity and revisions: content-derived UIDs, Predecessor Documents, algorithm equipment.

A SOP Instance UID names one content (PS3.3 C.12.1.1.1, PS3.5 9.1). radflag therefore derives
the UIDs of its result objects from *what they say*:

- the study (Study Instance UID),
- the model identity **including the weights sha256**,
- the output kind (``"SR"``, ``"SC"``),
- the content: the set of source SOP Instance UIDs and the result values (finding code,
  probability rounded to :data:`PROBABILITY_DECIMALS`, present/absent, threshold).

The same content computed again (a re-run after a crash, a re-send) gets the same UIDs; a
changed content (a late image, new weights, a new threshold) gets new ones. The Series
Instance UID depends on study, model identity and kind only, so every revision of a result
lands in the same series. A revised SR lists the SR it replaces in the Predecessor Documents
Sequence (PS3.3 C.17.2); every result object names the algorithm in its Contributing
Equipment Sequence with Purpose of Reference (DCM 109103) "Processing Algorithm" (PS3.3
C.12.1.1.1, IHE RAD TF-3 AI Results 6.5.3 / IHE AIR "Contributing Equipment").
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_io.uids import is_valid_uid

REVISION_UID_NAMESPACE = uuid.UUID("8f0d2c4b-3a71-4e59-b6d8-1c2e7a9f5b30")
"""Namespace of the name-based UUIDs (RFC 4122 v5) behind result and device UIDs."""

PROBABILITY_DECIMALS = 6
"""Probabilities are rounded to this many decimals before they name content (float noise)."""

PROCESSING_ALGORITHM = ("109103", "DCM", "Processing Algorithm")
"""Purpose of Reference of the algorithm's Contributing Equipment item (CID 7005)."""


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies a model: name, version and the sha256 of its weights."""

    name: str
    version: str
    weights_sha256: str

    def __post_init__(self) -> None:
        for field_name in ("name", "version", "weights_sha256"):
            if not str(getattr(self, field_name)).strip():
                raise ValueError(f"ModelIdentity.{field_name} must not be empty")


@dataclass(frozen=True)
class ResultContent:
    """The content a result object states: its sources and its values.

    Parameters
    ----------
    source_sop_instance_uids
        The analysed images (order does not matter).
    values
        The result values, e.g. ``{"finding": "233604007", "probability": 0.91,
        "present": True, "threshold": 0.5}``; floats are rounded to
        :data:`PROBABILITY_DECIMALS`.
    """

    source_sop_instance_uids: frozenset[str]
    values: Mapping[str, str | float | bool]

    def key(self) -> str:
        """Return a stable sha256 of the content (the name the UIDs derive from)."""
        canonical = {
            "sources": sorted(self.source_sop_instance_uids),
            "values": {
                k: round(v, PROBABILITY_DECIMALS) if isinstance(v, float) else v
                for k, v in sorted(self.values.items())
            },
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _uid(*parts: str) -> str:
    """Return a ``2.25.<uuid>`` UID (PS3.5 B.2) from an RFC 4122 v5 UUID of ``parts``."""
    return f"2.25.{uuid.uuid5(REVISION_UID_NAMESPACE, chr(0x1F).join(parts)).int}"


def content_result_uids(
    study_uid: str, model: ModelIdentity, kind: str, content: ResultContent
) -> tuple[str, str]:
    """Return ``(series_uid, sop_uid)`` of one result object (PS3.5 B.2 ``2.25.`` UIDs).

    The series UID depends on study, model identity (incl. weights sha256) and kind; the SOP
    Instance UID also on :meth:`ResultContent.key`.

    Raises
    ------
    ValueError
        If ``study_uid`` is not a valid UID or ``kind`` is empty.
    """
    if not is_valid_uid(study_uid):
        raise ValueError(f"study_uid is not a valid UID: {study_uid!r}")
    if not kind:
        raise ValueError("kind must not be empty")
    base = ("radflag-result", study_uid, model.name, model.version, model.weights_sha256, kind)
    return _uid(*base, "series"), _uid(*base, "instance", content.key())


def algorithm_device_uid(model: ModelIdentity) -> str:
    """Return the Device UID of the algorithm; it changes when the weights change."""
    return _uid("radflag-device", model.name, model.version, model.weights_sha256)


@dataclass(frozen=True)
class ObjectRef:
    """A stored DICOM object as a reference target (Hierarchical SOP Instance Reference)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, ds: Dataset) -> ObjectRef:
        """Return the reference to ``ds``."""
        return cls(
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
        )


def hierarchical_references(refs: Iterable[ObjectRef]) -> list[Dataset]:
    """Return Hierarchical SOP Instance Reference items (PS3.3 Table C.17-3), one per study."""
    studies: dict[str, dict[str, list[ObjectRef]]] = {}
    for ref in refs:
        studies.setdefault(ref.study_instance_uid, {}).setdefault(
            ref.series_instance_uid, []
        ).append(ref)
    items: list[Dataset] = []
    for study_uid, series in studies.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study_uid
        study_item.ReferencedSeriesSequence = []
        for series_uid, members in series.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid
            series_item.ReferencedSOPSequence = []
            for ref in members:
                sop = Dataset()
                sop.ReferencedSOPClassUID = ref.sop_class_uid
                sop.ReferencedSOPInstanceUID = ref.sop_instance_uid
                series_item.ReferencedSOPSequence.append(sop)
            study_item.ReferencedSeriesSequence.append(series_item)
        items.append(study_item)
    return items


def set_predecessor(sr: Dataset, predecessor: ObjectRef) -> None:
    """Make ``sr`` a revision of ``predecessor`` (SR Document General, PS3.3 C.17.2).

    Sets the Predecessor Documents Sequence (0040,A360), Type 1C: "required if this
    document replaces or amends" earlier SR documents.

    Raises
    ------
    ValueError
        If the predecessor is the document itself.
    """
    if predecessor.sop_instance_uid == str(sr.SOPInstanceUID):
        raise ValueError("an SR cannot be its own predecessor")
    sr.PredecessorDocumentsSequence = hierarchical_references([predecessor])


def predecessor_of(sr: Dataset) -> list[ObjectRef]:
    """Return the documents the Predecessor Documents Sequence of ``sr`` names."""
    out: list[ObjectRef] = []
    for study in sr.get("PredecessorDocumentsSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for sop in series.get("ReferencedSOPSequence", []):
                out.append(
                    ObjectRef(
                        str(study.StudyInstanceUID),
                        str(series.SeriesInstanceUID),
                        str(sop.ReferencedSOPClassUID),
                        str(sop.ReferencedSOPInstanceUID),
                    )
                )
    return out


def add_algorithm_equipment(
    ds: Dataset, model: ModelIdentity, manufacturer: str, *, institution_name: str | None = None
) -> None:
    """Append the algorithm's item to the Contributing Equipment Sequence (PS3.3 C.12.1.1.1).

    Purpose of Reference (DCM 109103) "Processing Algorithm", Manufacturer, Manufacturer's
    Model Name (model name), Software Versions (model version and weights sha256) and a
    Device UID (:func:`algorithm_device_uid`) that changes when the weights change, as the
    IHE AI Results profile asks (IHE RAD TF-3 6.5.3.2). An item with the same Device UID is
    replaced, not repeated.
    """
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROCESSING_ALGORITHM
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [code]
    item.Manufacturer = manufacturer[:64]
    item.ManufacturerModelName = model.name[:64]
    item.SoftwareVersions = [model.version[:64], model.weights_sha256[:64]]
    item.DeviceUID = algorithm_device_uid(model)
    if institution_name:
        item.InstitutionName = institution_name[:64]
    kept = [
        x
        for x in ds.get("ContributingEquipmentSequence", [])
        if str(x.get("DeviceUID", "")) != item.DeviceUID
    ]
    ds.ContributingEquipmentSequence = [*kept, item]


def set_revision_number(ds: Dataset, revision: int) -> None:
    """Set Instance Number = revision (the series is the same for every revision)."""
    if revision < 1:
        raise ValueError(f"revision must be >= 1, got {revision}")
    ds.InstanceNumber = revision
