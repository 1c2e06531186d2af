"""Result identity and revisions: content-derived UIDs, Predecessor Documents (PS3.3 C.17.2),
the algorithm's Contributing Equipment (IHE AIR) and the IOCM rejection note (KOS).

Validity is checked by dciodvfy and PixelMed's DicomSRValidator; read-back by highdicom.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from highdicom.ko import KeyObjectSelectionDocument
from highdicom.sr import CodedConcept, Comprehensive3DSR
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_io.kos import KOS_SOP_CLASS, build_rejection_note, rejected_instances
from dicom_io.revisions import (
    ObjectRef,
    ResultContent,
    add_algorithm_equipment,
    algorithm_device_uid,
    content_result_uids,
    predecessor_of,
    set_predecessor,
    set_revision_number,
)
from dicom_io.sr import as_comprehensive_sr, build_sr, comprehensive_sr_uid, model_identity
from tests.dicom_io.conftest import make_dx
from tests.dicom_io.test_sr import ALGORITHM, PNEUMONIA, _dciodvfy_errors, pixelmed_sr_validator

MODEL = model_identity(ALGORITHM)
STUDY = "1.2.826.0.1.3680043.8.498.1"


def _content(sources: list[str], probability: float = 0.8731) -> ResultContent:
    return ResultContent(
        frozenset(sources),
        {
            "finding": "SCT:233604007",
            "probability": probability,
            "present": True,
            "threshold": 0.42,
        },
    )


def test_same_content_same_uids_changed_content_new_sop_uid() -> None:
    a = content_result_uids(STUDY, MODEL, "SR", _content(["1.2.3", "1.2.4"]))
    assert a == content_result_uids(STUDY, MODEL, "SR", _content(["1.2.4", "1.2.3"]))
    assert a == content_result_uids(STUDY, MODEL, "SR", _content(["1.2.3", "1.2.4"], 0.87310000001))
    late = content_result_uids(STUDY, MODEL, "SR", _content(["1.2.3", "1.2.4", "1.2.5"]))
    other_value = content_result_uids(STUDY, MODEL, "SR", _content(["1.2.3", "1.2.4"], 0.5))
    assert late[1] != a[1] and other_value[1] != a[1]
    assert late[0] == a[0] == other_value[0]  # every revision in one series
    assert content_result_uids(STUDY, MODEL, "SC", _content(["1.2.3", "1.2.4"]))[1] != a[1]


def test_retrained_weights_change_uids_and_device_uid() -> None:
    retrained = dataclasses.replace(MODEL, weights_sha256="f" * 64)
    content = _content(["1.2.3"])
    assert content_result_uids(STUDY, MODEL, "SR", content) != content_result_uids(
        STUDY, retrained, "SR", content
    )
    assert algorithm_device_uid(MODEL) != algorithm_device_uid(retrained)


def _revision_pair(tmp_path: Path) -> tuple[Dataset, Dataset, Path]:
    """Revision 1 on two images, revision 2 after a late third image, revision 2 as a file."""
    study = make_dx().StudyInstanceUID
    sources = [make_dx(study_uid=study, seed=s) for s in (1, 2, 3)]
    docs = []
    for revision, subset in ((1, sources[:2]), (2, sources)):
        content = _content([str(ds.SOPInstanceUID) for ds in subset])
        series_uid, sop_uid = content_result_uids(str(study), MODEL, "SR", content)
        sr = build_sr(
            subset, PNEUMONIA, ALGORITHM, series_instance_uid=series_uid, sop_instance_uid=sop_uid
        )
        add_algorithm_equipment(sr, MODEL, ALGORITHM.manufacturer)
        set_revision_number(sr, revision)
        if docs:
            set_predecessor(sr, ObjectRef.of(docs[-1]))
        docs.append(sr)
    path = tmp_path / "sr-rev2.dcm"
    docs[1].save_as(path, enforce_file_format=True)
    return docs[0], docs[1], path


def test_revision_names_its_predecessor(tmp_path: Path) -> None:
    first, second, path = _revision_pair(tmp_path)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    back = dcmread(path)
    assert predecessor_of(back) == [ObjectRef.of(first)]
    assert "PredecessorDocumentsSequence" not in first
    with pytest.raises(ValueError, match="own predecessor"):
        set_predecessor(second, ObjectRef.of(second))


def test_highdicom_reads_the_algorithm_from_contributing_equipment(tmp_path: Path) -> None:
    _, _, path = _revision_pair(tmp_path)
    sr = Comprehensive3DSR.from_dataset(dcmread(path))
    purposes = [
        CodedConcept.from_dataset(x.PurposeOfReferenceCodeSequence[0])
        for x in sr.ContributingEquipmentSequence
    ]
    algo = [
        x
        for x, purpose in zip(sr.ContributingEquipmentSequence, purposes, strict=True)
        if purpose == CodedConcept("109103", "DCM", "Processing Algorithm")
    ]
    assert len(algo) == 1
    (item,) = algo
    assert item.ManufacturerModelName == ALGORITHM.name
    assert item.Manufacturer == ALGORITHM.manufacturer
    assert list(item.SoftwareVersions) == [ALGORITHM.version, ALGORITHM.weights_sha256]
    assert item.DeviceUID == algorithm_device_uid(MODEL)
    add_algorithm_equipment(sr, MODEL, ALGORITHM.manufacturer)  # idempotent
    assert sum(x.get("DeviceUID") == item.DeviceUID for x in sr.ContributingEquipmentSequence) == 1


@pytest.mark.dcmtk
@pytest.mark.parametrize("variant", ["3d", "comprehensive"])
def test_revised_sr_passes_pixelmed_and_dciodvfy(tmp_path: Path, variant: str) -> None:
    _, second, path = _revision_pair(tmp_path)
    if variant == "comprehensive":
        converted = as_comprehensive_sr(second)
        (ref,) = predecessor_of(converted)
        assert ref.sop_instance_uid == comprehensive_sr_uid(
            predecessor_of(second)[0].sop_instance_uid
        )
        path = tmp_path / "comprehensive.dcm"
        converted.save_as(path, enforce_file_format=True)
    output = pixelmed_sr_validator(path)
    assert "Found Root Template TID_1500 (MeasurementReport)" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []
    _, errors = _dciodvfy_errors(path)
    assert errors == []


@pytest.mark.dcmtk
def test_rejection_note_validates_and_references_the_superseded(tmp_path: Path) -> None:
    first, _, _ = _revision_pair(tmp_path)
    kos = build_rejection_note([first], MODEL, ALGORITHM.manufacturer)
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    assert back.SOPClassUID == KOS_SOP_CLASS
    assert back.ConceptNameCodeSequence[0].CodeValue == "113001"
    assert back.StudyInstanceUID == first.StudyInstanceUID
    assert back.PatientID == first.PatientID
    assert rejected_instances(back) == [str(first.SOPInstanceUID)]
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    KeyObjectSelectionDocument.from_dataset(back)
    assert build_rejection_note([first], MODEL, "x").SOPInstanceUID == back.SOPInstanceUID
    output, errors = _dciodvfy_errors(path)
    assert "KeyObjectSelectionDocument" in output
    assert errors == []
