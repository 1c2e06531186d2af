"""Result reporting as DICOM Structured Reports (highdicom).

Builds a Comprehensive 3D SR (PS3.3 A.35.13) whose content is a PS3.16 TID 1500
"Measurement Report":

- observation context (TID 1001) with a device observer (TID 1004): name, manufacturer,
  model name = algorithm version, and a Device Observer UID derived deterministically from
  the algorithm name and version;
- procedure reported, from PS3.16 CID 100 (``Imaging procedure`` for radiographs, ``CT
  unspecified body region`` for CT);
- image library (TID 1600) listing every source image;
- one measurement group (TID 1501) per finding: tracking identifier + tracking UID, the
  finding type (e.g. SCT 233604007 pneumonia, SCT 840539006 COVID-19), finding site lung
  (SCT 39607008), algorithm identification (TID 4019: name, version, manufacturer,
  parameters ``threshold=...`` and ``weights_sha256=...``), the source images, a qualitative
  evaluation whose concept is the finding and whose value is present (SCT 52101004) / absent
  (SCT 272519000), and a NUM "Probability" (DCM 122157) with UCUM unit ``1`` (no units,
  value in [0, 1]).

This is the content the IHE Radiology AI Results (AIR) profile asks of an image-level
classification result (IHE RAD TF-3 6.5.3, "AI Results" SR). The document is flagged
PRELIMINARY, COMPLETE and UNVERIFIED: it is machine output that no physician has verified.
UIDs are deterministic (:func:`result_uids`) so reprocessing a study replaces its SR instead
of adding one. :func:`as_comprehensive_sr` turns it into a Comprehensive SR (PS3.3 A.35.3)
for a PACS that refuses the 3D SOP class (the content uses no SCOORD3D); :func:`read_sr`
reads the result back.
"""

from __future__ import annotations

import copy
import enum
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io.headers import repair_source, valid_uid
from dicom_io.revisions import ModelIdentity, algorithm_device_uid
from dicom_io.uids import is_valid_uid

RADFLAG_UID_NAMESPACE = uuid.UUID("5b1c3f0e-6d2a-4f57-9a43-2f8e1d6c7a10")
"""Namespace of radflag's name-based UUIDs (RFC 4122 v5), turned into ``2.25.`` UIDs."""

LUNG = CodedConcept("39607008", "SCT", "Lung")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
UNITLESS = CodedConcept("1", "UCUM", "no units")
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")
CT_UNSPECIFIED_BODY_REGION = CodedConcept("25045-6", "LN", "CT unspecified body region")
PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
COVID_19 = CodedConcept("840539006", "SCT", "COVID-19")

ALGORITHM_PARAMETER_THRESHOLD = "threshold"
ALGORITHM_PARAMETER_WEIGHTS = "weights_sha256"


class SRStorageClass(enum.StrEnum):
    """SR Storage SOP classes radflag writes (PS3.4 B.5)."""

    COMPREHENSIVE_3D = "1.2.840.10008.5.1.4.1.1.88.34"
    """Comprehensive 3D SR Storage, the default (TID 1500 may use SCOORD3D)."""
    COMPREHENSIVE = "1.2.840.10008.5.1.4.1.1.88.33"
    """Comprehensive SR Storage, for a PACS that refuses the 3D class."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of the model that produced a result (goes into TID 4019 and TID 1004)."""

    name: str
    version: str
    manufacturer: str
    weights_sha256: str
    threshold: float

    def __post_init__(self) -> None:
        for field_name in ("name", "version", "manufacturer"):
            if not str(getattr(self, field_name)).strip():
                raise ValueError(f"AlgorithmInfo.{field_name} must not be empty")
        if not math.isfinite(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"AlgorithmInfo.threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class FindingResult:
    """One classifier output, e.g. ``233604007`` / ``SCT`` / ``Pneumonia``."""

    code_value: str
    code_scheme: str
    code_meaning: str
    probability: float
    present: bool

    def __post_init__(self) -> None:
        if not math.isfinite(self.probability) or not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"FindingResult.probability must be in [0, 1], got {self.probability}")
        for field_name in ("code_value", "code_scheme", "code_meaning"):
            if not str(getattr(self, field_name)).strip():
                raise ValueError(f"FindingResult.{field_name} must not be empty")

    @property
    def concept(self) -> CodedConcept:
        """The finding as a coded concept."""
        return CodedConcept(self.code_value, self.code_scheme, self.code_meaning)


def _name_based_uid(*parts: str) -> str:
    """Return a ``2.25.<uuid>`` UID (PS3.5 B.2) from an RFC 4122 v5 UUID of ``parts``."""
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(RADFLAG_UID_NAMESPACE, name).int}"


def result_uids(study_uid: str, model_name: str, model_version: str, kind: str) -> tuple[str, str]:
    """Return deterministic ``(series_uid, sop_uid)`` for one kind of result of one model.

    The same study, model identity and output kind (e.g. ``"sr"``, ``"sc"``) always give the
    same UIDs, so a re-sent result replaces the previous one at the PACS.

    Parameters
    ----------
    study_uid
        Study Instance UID of the analysed study.
    model_name, model_version
        Model identity.
    kind
        Output kind.

    Returns
    -------
    tuple of str
        ``(series_instance_uid, sop_instance_uid)``, both ``2.25.`` UIDs (PS3.5 B.2).

    Raises
    ------
    ValueError
        If ``study_uid`` is not a valid UID or another argument is empty.
    """
    if not is_valid_uid(study_uid):
        raise ValueError(f"study_uid is not a valid UID: {study_uid!r}")
    named = {"model_name": model_name, "model_version": model_version, "kind": kind}
    for name, value in named.items():
        if not value:
            raise ValueError(f"{name} must not be empty")
    base = ("radflag-result", study_uid, model_name, model_version, kind)
    return _name_based_uid(*base, "series"), _name_based_uid(*base, "instance")


def device_observer_uid(algorithm: AlgorithmInfo) -> str:
    """Return the Device Observer UID (TID 1004) of an algorithm.

    The same UID as the algorithm's Contributing Equipment Device UID
    (:func:`dicom_io.revisions.algorithm_device_uid`): it changes when the weights change.
    """
    return algorithm_device_uid(model_identity(algorithm))


def model_identity(algorithm: AlgorithmInfo) -> ModelIdentity:
    """Return the identity (name, version, weights sha256) of ``algorithm``."""
    return ModelIdentity(
        name=algorithm.name,
        version=algorithm.version,
        weights_sha256=algorithm.weights_sha256 or "unknown",
    )


def _procedure(sources: Sequence[Dataset]) -> CodedConcept:
    """Return the Procedure Reported (TID 1500 row 4), a code of CID 100."""
    modalities = {str(ds.get("Modality", "")).upper() for ds in sources}
    if modalities == {"CT"}:
        return CT_UNSPECIFIED_BODY_REGION
    return IMAGING_PROCEDURE


def _check_sources(sources: Sequence[Dataset]) -> None:
    if not sources:
        raise ValueError("sources must contain at least one image dataset")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in sources}
    if len(studies) != 1 or not is_valid_uid(next(iter(studies))):
        raise ValueError("sources must all belong to one study with a valid StudyInstanceUID")
    patients = {str(ds.get("PatientID", "")) for ds in sources}
    if len(patients) != 1:
        raise ValueError("sources must all belong to one patient (PatientID differs)")
    for ds in sources:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
            if not is_valid_uid(str(ds.get(keyword, ""))):
                raise ValueError(f"a source dataset lacks a valid {keyword}")


def _measurement_group(
    finding: FindingResult,
    algorithm: AlgorithmInfo,
    algorithm_id: AlgorithmIdentification,
    sop_instance_uid: str,
    sources: Sequence[Dataset],
) -> MeasurementsAndQualitativeEvaluations:
    tracking = TrackingIdentifier(
        uid=_name_based_uid(
            "radflag-tracking", sop_instance_uid, finding.code_scheme, finding.code_value
        ),
        identifier=f"{algorithm.name} {finding.code_meaning}"[:64],
    )
    probability = Measurement(
        name=PROBABILITY,
        value=float(finding.probability),
        unit=UNITLESS,
        algorithm_id=algorithm_id,
    )
    evaluation = QualitativeEvaluation(
        name=finding.concept, value=PRESENT if finding.present else ABSENT
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding.concept,
        algorithm_id=algorithm_id,
        finding_sites=[FindingSite(anatomic_location=LUNG)],
        measurements=[probability],
        qualitative_evaluations=[evaluation],
        source_images=[SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    )


SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
"""Secondary Capture Image Storage and its multi-frame variants (PS3.4 B.5)."""

PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
"""Modalities for which highdicom adds TID 1603 projection descriptors."""


def _positive_pair(value: Any) -> tuple[float, float] | None:
    """Return two positive finite numbers (row, column) from a 2-valued DS, else None."""
    try:
        pair = (float(value[0]), float(value[1])) if value is not None and len(value) == 2 else None
    except (TypeError, ValueError, IndexError):
        return None
    if pair is None or not all(math.isfinite(v) and v > 0 for v in pair):
        return None
    return pair


def _orientation_pair(value: Any) -> tuple[str, str] | None:
    """Return Patient Orientation (PS3.3 C.7.6.1.1.1) row and column, when both are given."""
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    pair = (str(value[0]).strip(), str(value[1]).strip())
    return pair if all(pair) else None


def _library_descriptors(ds: Dataset) -> list[Any]:
    """TID 1603 descriptors of a projection image, only those present and valid.

    Patient Orientation (row, column) and Imager Pixel Spacing (vertical, horizontal), each
    only when the source carries a valid value; an old CR without them gets none.
    """
    items: list[Any] = []
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    orientation = _orientation_pair(ds.get("PatientOrientation"))
    if orientation is not None:
        items.append(TextContentItem(codes.DCM.PatientOrientationRow, orientation[0], acq))
        items.append(TextContentItem(codes.DCM.PatientOrientationColumn, orientation[1], acq))
    spacing = _positive_pair(ds.get("ImagerPixelSpacing"))
    if spacing is not None:
        mm = codes.UCUM.Millimeter
        for name, value in (
            (codes.DCM.HorizontalPixelSpacing, spacing[1]),
            (codes.DCM.VerticalPixelSpacing, spacing[0]),
        ):
            items.append(NumContentItem(name, value, mm, relationship_type=acq))
    return items


def _library_view(ds: Dataset) -> Dataset:
    """Return the part of a source that highdicom's TID 1600 image library reads, made safe.

    highdicom adds modality-specific descriptors unconditionally (and fails on an absent or
    empty Patient Orientation or Imager Pixel Spacing), so the view carries only the
    identifying attributes, Rows/Columns, a valid Frame of Reference UID and a neutral
    Modality; :func:`_add_library_descriptors` then adds the descriptors that are valid.
    """
    view = Dataset()
    view.SOPClassUID = ds.SOPClassUID
    view.SOPInstanceUID = ds.SOPInstanceUID
    view.Modality = "OT"
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        setattr(view, keyword, int(value) if isinstance(value, int) and value > 0 else 1)
    frame_of_reference = str(ds.get("FrameOfReferenceUID", "") or "")
    if valid_uid(frame_of_reference):
        view.FrameOfReferenceUID = frame_of_reference
    if str(ds.get("Modality", "")).upper() == "CT" and _cross_sectional_geometry(ds, view):
        view.Modality = "CT"  # highdicom's TID 1604 descriptors, all values checked
    return view


def _numbers(value: Any, count: int) -> list[float] | None:
    """Return ``count`` finite numbers from a multi-valued DS, else None."""
    try:
        numbers = [float(v) for v in value] if value is not None else []
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(map(math.isfinite, numbers)) else None


def _cross_sectional_geometry(ds: Dataset, view: Dataset) -> bool:
    """Copy Pixel Spacing, Slice Thickness and the plane (TID 1604) when all are valid."""
    spacing = _positive_pair(ds.get("PixelSpacing"))
    thickness = _numbers([ds.get("SliceThickness")], 1)
    orientation = _numbers(ds.get("ImageOrientationPatient"), 6)
    position = _numbers(ds.get("ImagePositionPatient"), 3)
    if spacing is None or thickness is None or orientation is None or position is None:
        return False
    view.PixelSpacing = list(spacing)
    view.SliceThickness = thickness[0]
    view.ImageOrientationPatient = orientation
    view.ImagePositionPatient = position
    return True


ACQUISITION_MODALITIES = {
    "CR": CodedConcept("CR", "DCM", "Computed Radiography"),
    "DX": CodedConcept("DX", "DCM", "Digital Radiography"),
    "CT": CodedConcept("CT", "DCM", "Computed Tomography"),
}
"""Modality codes of PS3.16 CID 29 for the modalities radflag analyses."""

_MODALITY_CONCEPT = "121139"


def _fix_library_modality(entry: Dataset, source: Dataset) -> None:
    """Give a Secondary Capture entry its acquisition modality (CID 29) or none.

    highdicom derives TID 1602 row 1 from the SOP class, which for a Secondary Capture is
    ``OT``, not a CID 29 code. A digitised chest film says CR/DX in Modality; otherwise the
    optional descriptor is left out.
    """
    code = ACQUISITION_MODALITIES.get(str(source.get("Modality", "")).upper())
    kept = []
    for item in entry.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != _MODALITY_CONCEPT:
            kept.append(item)
        elif code is not None:
            item.ConceptCodeSequence[0].CodeValue = code.value
            item.ConceptCodeSequence[0].CodingSchemeDesignator = code.scheme_designator
            item.ConceptCodeSequence[0].CodeMeaning = code.meaning
            kept.append(item)
    entry.ContentSequence = kept


def _add_library_descriptors(report: MeasurementReport, sources: Sequence[Dataset]) -> None:
    """Complete each image entry of the report's image library from its source.

    Projection images get :func:`_library_descriptors`; Secondary Capture entries get their
    acquisition modality (:func:`_fix_library_modality`).
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for item in report[0].ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImageLibrary.value:
            continue
        for group in item.ContentSequence:
            for entry in group.ContentSequence:
                if entry.ValueType != "IMAGE":
                    continue
                source = by_uid[str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
                if str(source.SOPClassUID).startswith(SECONDARY_CAPTURE_PREFIX):
                    _fix_library_modality(entry, source)
                if str(source.get("Modality", "")).upper() in PROJECTION_MODALITIES:
                    entry.ContentSequence.extend(_library_descriptors(source))


def build_sr(
    sources: Sequence[Dataset],
    finding: FindingResult | Sequence[FindingResult],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    institution_name: str | None = None,
    storage_class: SRStorageClass = SRStorageClass.COMPREHENSIVE_3D,
) -> Dataset:
    """Build a TID 1500 Comprehensive 3D SR reporting ``finding`` on ``sources``.

    Parameters
    ----------
    sources
        The analysed images (headers suffice; Pixel Data is not needed). They define the
        patient and study of the SR and are listed in its image library and evidence.
    finding
        One finding or several (one TID 1501 measurement group each).
    algorithm
        Model identity and decision threshold.
    series_instance_uid, sop_instance_uid
        UIDs of the SR (see :func:`result_uids`).
    series_number
        Series Number of the SR series.
    institution_name
        Optional Institution Name of the creating device.
    storage_class
        Comprehensive 3D SR (default) or Comprehensive SR.

    Returns
    -------
    Dataset
        The SR document (a :class:`highdicom.sr.Comprehensive3DSR` or
        :class:`highdicom.sr.ComprehensiveSR`, Explicit VR Little Endian), ready to be sent
        or written.

    Raises
    ------
    ValueError
        If the sources are empty, mix studies or patients, or lack UIDs, or a UID is invalid.

    Notes
    -----
    The sources are copied through :func:`dicom_io.headers.repair_source` first: invalid
    or over-long values of the copied patient/study attributes are repaired or emptied,
    so a messy header never prevents the SR (call it yourself to audit the repairs).
    """
    _check_sources(sources)
    sources = [repair_source(ds).dataset for ds in sources]
    for name, value in (
        ("series_instance_uid", series_instance_uid),
        ("sop_instance_uid", sop_instance_uid),
    ):
        if not is_valid_uid(value):
            raise ValueError(f"{name} is not a valid UID: {value!r}")
    findings = [finding] if isinstance(finding, FindingResult) else list(finding)
    if not findings:
        raise ValueError("finding must contain at least one FindingResult")

    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        manufacturer=algorithm.manufacturer,
        parameters=[
            f"{ALGORITHM_PARAMETER_THRESHOLD}={algorithm.threshold:g}",
            f"{ALGORITHM_PARAMETER_WEIGHTS}={algorithm.weights_sha256}",
        ],
    )
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(algorithm),
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.version,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=_procedure(sources),
        imaging_measurements=[
            _measurement_group(item, algorithm, algorithm_id, sop_instance_uid, sources)
            for item in findings
        ],
        referenced_images=[_library_view(ds) for ds in sources],
    )
    _add_library_descriptors(report, sources)
    document_class = (
        Comprehensive3DSR if storage_class is SRStorageClass.COMPREHENSIVE_3D else ComprehensiveSR
    )
    return document_class(
        evidence=list(sources),
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        institution_name=institution_name,
        series_description=f"AI result {algorithm.name} {algorithm.version}"[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def comprehensive_sr_uid(sop_instance_uid: str) -> str:
    """Return the SOP Instance UID of the Comprehensive SR variant of a 3D SR document.

    A different SOP class needs a different instance UID (PS3.5 9.1); deriving it keeps it
    deterministic, so the variant too replaces itself when re-sent.
    """
    return _name_based_uid("radflag-comprehensive-sr", sop_instance_uid)


def as_comprehensive_sr(sr: Dataset) -> Dataset:
    """Return a Comprehensive SR (PS3.3 A.35.3) copy of a Comprehensive 3D SR document.

    For a destination that refuses Comprehensive 3D SR Storage. The content tree is kept as
    is: radflag's TID 1500 uses no SCOORD3D, which is the only value type Comprehensive SR
    lacks. The SOP Instance UID is :func:`comprehensive_sr_uid` of the original.

    Raises
    ------
    ValueError
        If ``sr`` is not a Comprehensive 3D SR or contains a SCOORD3D content item.
    """
    if str(sr.get("SOPClassUID", "")) != SRStorageClass.COMPREHENSIVE_3D.value:
        raise ValueError("sr is not a Comprehensive 3D SR document")
    if _has_value_type(sr, "SCOORD3D"):
        raise ValueError("sr contains SCOORD3D content, which Comprehensive SR cannot carry")
    out = copy.deepcopy(sr)
    out.SOPClassUID = SRStorageClass.COMPREHENSIVE.value
    out.SOPInstanceUID = comprehensive_sr_uid(str(sr.SOPInstanceUID))
    _predecessors_as_comprehensive(out)
    if getattr(out, "file_meta", None) is not None:
        out.file_meta.MediaStorageSOPClassUID = out.SOPClassUID
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _predecessors_as_comprehensive(sr: Dataset) -> None:
    """Point the Predecessor Documents of a converted SR at the predecessors' converted twins.

    A destination that gets Comprehensive SR holds the Comprehensive SR variant of the
    previous revision, not the 3D original (PS3.3 C.17.2).
    """
    for study in sr.get("PredecessorDocumentsSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for sop in series.get("ReferencedSOPSequence", []):
                if str(sop.ReferencedSOPClassUID) == SRStorageClass.COMPREHENSIVE_3D.value:
                    sop.ReferencedSOPClassUID = SRStorageClass.COMPREHENSIVE.value
                    sop.ReferencedSOPInstanceUID = comprehensive_sr_uid(
                        str(sop.ReferencedSOPInstanceUID)
                    )


def _has_value_type(item: Dataset, value_type: str) -> bool:
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == value_type or _has_value_type(child, value_type):
            return True
    return False


@dataclass(frozen=True)
class SRContent:
    """What :func:`read_sr` recovers from a radflag SR."""

    algorithm_name: str
    algorithm_version: str
    algorithm_parameters: dict[str, str]
    device_observer_uid: str
    findings: list[FindingResult]
    source_sop_instance_uids: list[str]


def read_sr(sr: Dataset) -> SRContent:
    """Read finding, probability and model identity back from a TID 1500 SR (highdicom).

    Parameters
    ----------
    sr
        A Comprehensive 3D SR or Comprehensive SR written by :func:`build_sr` (or by another
        producer following the same TID 1500 / TID 4019 pattern).

    Raises
    ------
    ValueError
        If the document is not a TID 1500 measurement report with a device observer and at
        least one measurement group carrying a probability and a qualitative evaluation.
    """
    sop_class = str(sr.get("SOPClassUID", ""))
    document: Comprehensive3DSR | ComprehensiveSR
    if sop_class == SRStorageClass.COMPREHENSIVE_3D.value:
        document = Comprehensive3DSR.from_dataset(sr, copy=True)
    elif sop_class == SRStorageClass.COMPREHENSIVE.value:
        document = ComprehensiveSR.from_dataset(sr, copy=True)
    else:
        raise ValueError(f"not a Comprehensive (3D) SR: SOP class {sop_class!r}")
    report = MeasurementReport.from_sequence(document.content)
    observers = report.get_observer_contexts(observer_type=codes.DCM.Device)
    if not observers:
        raise ValueError("the SR has no device observer (TID 1004)")
    device: Any = observers[0].observer_identifying_attributes
    device_uid = str(device.uid)
    findings: list[FindingResult] = []
    name = version = ""
    parameters: dict[str, str] = {}
    sources: list[str] = []
    for group in report.get_image_measurement_groups():
        evaluations = group.get_qualitative_evaluations()
        probabilities = [m for m in group.get_measurements() if m.name.value == PROBABILITY.value]
        if not evaluations or not probabilities:
            raise ValueError("a measurement group lacks its evaluation or probability")
        finding = evaluations[0].name
        answer: Any = evaluations[0].value
        findings.append(
            FindingResult(
                code_value=finding.value,
                code_scheme=finding.scheme_designator,
                code_meaning=finding.meaning,
                probability=float(probabilities[0].value),
                present=answer.value == PRESENT.value,
            )
        )
        for item in group[0].ContentSequence:
            if item.ValueType != "TEXT":
                continue
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            if meaning == "Algorithm Name":
                name = str(item.TextValue)
            elif meaning == "Algorithm Version":
                version = str(item.TextValue)
            elif meaning == "Algorithm Parameters" and "=" in str(item.TextValue):
                key, _, value = str(item.TextValue).partition("=")
                parameters[key] = value
        for ref in group.source_images:
            uid = str(ref.referenced_sop_instance_uid)
            if uid not in sources:
                sources.append(uid)
    if not findings:
        raise ValueError("the SR has no measurement group")
    return SRContent(
        algorithm_name=name,
        algorithm_version=version,
        algorithm_parameters=parameters,
        device_observer_uid=device_uid,
        findings=findings,
        source_sop_instance_uids=sources,
    )


__all__ = [
    "COVID_19",
    "PNEUMONIA",
    "AlgorithmInfo",
    "FindingResult",
    "SRContent",
    "SRStorageClass",
    "as_comprehensive_sr",
    "build_sr",
    "comprehensive_sr_uid",
    "device_observer_uid",
    "model_identity",
    "read_sr",
    "result_uids",
]
