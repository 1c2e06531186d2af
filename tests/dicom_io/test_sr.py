"""SR construction: DICOM validity (dciodvfy), DCMTK rendering, highdicom round trip."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from highdicom.sr import Comprehensive3DSR, MeasurementReport
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io.sr import (
    AlgorithmInfo,
    FindingResult,
    build_sr,
    device_observer_uid,
    result_uids,
)
from tests.dicom_io.conftest import make_dx, require_tool

ALGORITHM = AlgorithmInfo(
    name="radflag-pneumonia",
    version="1.2.0",
    manufacturer="radflag project",
    weights_sha256="0123456789abcdef" * 4,
    threshold=0.42,
)
PNEUMONIA = FindingResult("233604007", "SCT", "Pneumonia", probability=0.8731, present=True)


def build(sources: list[Dataset], finding: FindingResult = PNEUMONIA) -> Dataset:
    series_uid, sop_uid = result_uids(
        str(sources[0].StudyInstanceUID), ALGORITHM.name, ALGORITHM.version, "sr"
    )
    return build_sr(
        sources,
        finding,
        ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        institution_name="Test Hospital",
    )


@pytest.fixture
def sr_file(tmp_path: Path) -> tuple[Path, Dataset]:
    source = make_dx()
    sr = build([source])
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path, source


def test_sr_same_patient_and_study(sr_file: tuple[Path, Dataset]) -> None:
    path, source = sr_file
    sr = dcmread(path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesNumber == 9901
    assert sr.InstitutionName == "Test Hospital"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID


@pytest.mark.dcmtk
def test_dciodvfy_reports_no_errors(sr_file: tuple[Path, Dataset]) -> None:
    path, _ = sr_file
    proc = subprocess.run(
        [require_tool("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert "Comprehensive3DSR" in output  # it really validated the IOD
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == []


@pytest.mark.dcmtk
def test_dsrdump_shows_finding_and_probability(sr_file: tuple[Path, Dataset]) -> None:
    path, _ = sr_file
    proc = subprocess.run(
        [require_tool("dsrdump"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert '(233604007,SCT,"Pneumonia")' in proc.stdout
    assert 'CODE:(,,"Pneumonia")=(52101004,SCT,"Present")' in proc.stdout
    assert 'NUM:(,,"Probability")="0.8731"' in proc.stdout
    assert '"Algorithm Name")="radflag-pneumonia"' in proc.stdout


def test_highdicom_round_trip(sr_file: tuple[Path, Dataset]) -> None:
    path, _ = sr_file
    sr = Comprehensive3DSR.from_dataset(dcmread(path))
    report = MeasurementReport.from_sequence(sr.content)

    [observer] = report.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert device.uid == device_observer_uid(ALGORITHM)
    assert (device.name, device.model_name) == (ALGORITHM.name, ALGORITHM.version)
    [group] = report.get_image_measurement_groups()
    [evaluation] = group.get_qualitative_evaluations()
    assert evaluation.name.value == "233604007"
    assert evaluation.value.value == "52101004"  # present
    [measurement] = group.get_measurements()
    assert measurement.name.value == "122157"
    assert measurement.value == pytest.approx(0.8731)
    assert measurement.unit.value == "1"
    assert [site.value.value for site in group.finding_sites] == ["39607008"]
    texts = {
        (item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT"
    }
    assert ("Algorithm Name", "radflag-pneumonia") in texts
    assert ("Algorithm Version", "1.2.0") in texts
    assert ("Algorithm Parameters", "threshold=0.42") in texts
    assert ("Algorithm Parameters", f"weights_sha256={ALGORITHM.weights_sha256}") in texts


def test_absent_finding_and_multiple_groups() -> None:
    source = make_dx()
    absent = FindingResult("233604007", "SCT", "Pneumonia", probability=0.1, present=False)
    other = FindingResult("36118008", "SCT", "Pneumothorax", probability=0.05, present=False)
    sr = build_sr(
        [source],
        [absent, other],
        ALGORITHM,
        series_instance_uid="1.2.3",
        sop_instance_uid="1.2.3.4",
    )
    report = MeasurementReport.from_sequence(Comprehensive3DSR.from_dataset(sr).content)
    groups = report.get_image_measurement_groups()
    evaluations = [g.get_qualitative_evaluations()[0] for g in groups]
    values = sorted((e.name.meaning, e.value.value) for e in evaluations)
    assert values == [("Pneumonia", "272519000"), ("Pneumothorax", "272519000")]


def test_result_uids_are_deterministic_and_distinct() -> None:
    a = result_uids("1.2.3", "m", "1", "sr")
    assert a == result_uids("1.2.3", "m", "1", "sr")
    assert a != result_uids("1.2.3", "m", "2", "sr")
    assert a != result_uids("1.2.3", "m", "1", "sc")
    assert a != result_uids("1.2.4", "m", "1", "sr")
    assert a[0] != a[1]
    for uid in a:
        assert uid.startswith("2.25.") and len(uid) <= 64


def test_sr_uids_are_stable_across_rebuilds() -> None:
    source = make_dx()
    first, second = build([source]), build([source])
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID


def test_invalid_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="sources"):
        build_sr([], PNEUMONIA, ALGORITHM, series_instance_uid="1.2", sop_instance_uid="1.3")
    with pytest.raises(ValueError, match="one study"):
        build_sr(
            [make_dx(), make_dx()],
            PNEUMONIA,
            ALGORITHM,
            series_instance_uid="1.2",
            sop_instance_uid="1.3",
        )
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_sr([make_dx()], PNEUMONIA, ALGORITHM, series_instance_uid="1.2", sop_instance_uid="x")
    with pytest.raises(ValueError, match="probability"):
        FindingResult("1", "SCT", "x", probability=1.5, present=True)
    with pytest.raises(ValueError, match="threshold"):
        AlgorithmInfo("n", "v", "m", "", threshold=float("nan"))
