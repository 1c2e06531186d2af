"""Result reporting as DICOM Structured Reports (highdicom).

Builds a Comprehensive 3D SR (PS3.3 A.35.13) whose content is a PS3.16 TID 1500
"Measurement Report":

- observation context (TID 1001) with a device observer (TID 1004): name, manufacturer,
  model name = algorithm version, and a Device Observer UID derived deterministically from
  the algorithm name and version;
- procedure reported (plain chest X-ray or CT of chest, from the sources' modality);
- image library (TID 1600) listing every source image;
- one measurement group (TID 1501) per finding: tracking identifier + tracking UID, finding
  site lung (SCT 39607008), algorithm identification (TID 4019: name, version, manufacturer,
  parameters ``threshold=...`` and ``weights_sha256=...``), a qualitative evaluation whose
  concept is the finding and whose value is present (SCT 52101004) / absent (SCT 272519000),
  and a NUM "Probability" (DCM 122157) with UCUM unit ``1`` (no units, value in [0, 1]).

The document is flagged PRELIMINARY, COMPLETE and UNVERIFIED: it is machine output that no
physician has verified. UIDs are deterministic (:func:`result_uids`) so reprocessing a study
replaces its SR instead of adding one.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io.uids import is_valid_uid

RADFLAG_UID_NAMESPACE = uuid.UUID("5b1c3f0e-6d2a-4f57-9a43-2f8e1d6c7a10")
"""Namespace of radflag's name-based UUIDs (RFC 4122 v5), turned into ``2.25.`` UIDs."""

LUNG = CodedConcept("39607008", "SCT", "Lung")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
UNITLESS = CodedConcept("1", "UCUM", "no units")
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
CT_OF_CHEST = CodedConcept("169069000", "SCT", "CT of chest")
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")

ALGORITHM_PARAMETER_THRESHOLD = "threshold"
ALGORITHM_PARAMETER_WEIGHTS = "weights_sha256"


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
    """Return the deterministic Device Observer UID (TID 1004) of an algorithm."""
    return _name_based_uid("radflag-device", algorithm.name, algorithm.version)


def _procedure(sources: Sequence[Dataset]) -> CodedConcept:
    modalities = {str(ds.get("Modality", "")).upper() for ds in sources}
    if modalities <= {"CR", "DX"}:
        return PLAIN_CHEST_XRAY
    if modalities == {"CT"}:
        return CT_OF_CHEST
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
    )


def build_sr(
    sources: Sequence[Dataset],
    finding: FindingResult | Sequence[FindingResult],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    institution_name: str | None = None,
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

    Returns
    -------
    Dataset
        The SR document (a :class:`highdicom.sr.Comprehensive3DSR`, Explicit VR Little
        Endian), ready to be sent or written.

    Raises
    ------
    ValueError
        If the sources are empty, mix studies or patients, or lack UIDs, or a UID is invalid.
    """
    _check_sources(sources)
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
            _measurement_group(item, algorithm, algorithm_id, sop_instance_uid) for item in findings
        ],
        referenced_images=list(sources),
    )
    return Comprehensive3DSR(
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


__all__ = [
    "AlgorithmInfo",
    "FindingResult",
    "build_sr",
    "device_observer_uid",
    "result_uids",
]
