"""SR construction: DICOM validity (dciodvfy), DCMTK rendering, highdicom round trip."""

from __future__ import annotations

import shutil
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
    SRStorageClass,
    as_comprehensive_sr,
    build_sr,
    comprehensive_sr_uid,
    device_observer_uid,
    read_sr,
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


PIXELMED_JAVA_OPTS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


def pixelmed_sr_validator(path: Path) -> str:
    """Run PixelMed's DicomSRValidator (IOD + template rules); return its output."""
    java = shutil.which("java")
    jars = sorted(Path("/usr/share/java").glob("*.jar"))
    if java is None or not any(j.name.startswith("pixelmed") for j in jars):
        pytest.skip("java or PixelMed not installed")
    proc = subprocess.run(
        [
            java,
            *PIXELMED_JAVA_OPTS,
            "-cp",
            ":".join(map(str, jars)),
            "com.pixelmed.validate.DicomSRValidator",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return proc.stdout + proc.stderr


def _dciodvfy_errors(path: Path) -> tuple[str, list[str]]:
    proc = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    return output, [line for line in output.splitlines() if line.startswith("Error")]


@pytest.fixture
def air_documents(tmp_path: Path) -> dict[str, Path]:
    """A two-image, two-finding 3D SR and its Comprehensive SR variant, as files."""
    study = make_dx().StudyInstanceUID
    sources = [make_dx(study_uid=study, seed=1), make_dx(study_uid=study, seed=2)]
    covid = FindingResult("840539006", "SCT", "COVID-19", probability=0.03, present=False)
    series_uid, sop_uid = result_uids(str(study), ALGORITHM.name, ALGORITHM.version, "SR")
    sr = build_sr(
        sources,
        [PNEUMONIA, covid],
        ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )
    paths = {"3d": tmp_path / "sr3d.dcm", "comprehensive": tmp_path / "sr.dcm"}
    sr.save_as(paths["3d"], enforce_file_format=True)
    as_comprehensive_sr(sr).save_as(paths["comprehensive"], enforce_file_format=True)
    return paths


@pytest.mark.dcmtk
@pytest.mark.parametrize("variant", ["3d", "comprehensive"])
def test_pixelmed_and_dciodvfy_find_no_errors(air_documents: dict[str, Path], variant: str) -> None:
    path = air_documents[variant]
    output = pixelmed_sr_validator(path)
    iod = "Comprehensive3DSR" if variant == "3d" else "ComprehensiveSR"
    assert f"Found {iod} IOD" in output
    assert "Found Root Template TID_1500 (MeasurementReport)" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []
    dciodvfy_output, errors = _dciodvfy_errors(path)
    assert iod in dciodvfy_output
    assert errors == []


@pytest.mark.dcmtk
def test_dsrdump_shows_air_content(air_documents: dict[str, Path]) -> None:
    proc = subprocess.run(
        [require_tool("dsrdump"), str(air_documents["3d"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Comprehensive 3D SR" in out
    assert "PRELIMINARY" in out and "UNVERIFIED" in out and "COMPLETE" in out
    assert 'CODE:(,,"Finding")=(840539006,SCT,"COVID-19")' in out
    assert 'CODE:(,,"COVID-19")=(272519000,SCT,"Absent")' in out
    assert 'CODE:(,,"Finding Site")=(39607008,SCT,"Lung")' in out
    assert '(,,"Device Observer UID")' in out
    assert '"Tracking Unique Identifier")' in out
    assert out.count('IMAGE:(,,"Source of Measurement")') == 4  # 2 images x 2 groups


def test_read_sr_recovers_finding_probability_and_model(air_documents: dict[str, Path]) -> None:
    for path in air_documents.values():
        content = read_sr(dcmread(path))
        assert content.algorithm_name == ALGORITHM.name
        assert content.algorithm_version == ALGORITHM.version
        assert content.algorithm_parameters == {
            "threshold": "0.42",
            "weights_sha256": ALGORITHM.weights_sha256,
        }
        assert content.device_observer_uid == device_observer_uid(ALGORITHM)
        by_code = {f.code_value: f for f in content.findings}
        assert by_code["233604007"].probability == pytest.approx(0.8731)
        assert by_code["233604007"].present is True
        assert by_code["840539006"].probability == pytest.approx(0.03)
        assert by_code["840539006"].present is False
        assert len(content.source_sop_instance_uids) == 2


def test_comprehensive_variant_is_deterministic_and_distinct(
    air_documents: dict[str, Path],
) -> None:
    three_d = dcmread(air_documents["3d"])
    plain = dcmread(air_documents["comprehensive"])
    assert plain.SOPClassUID == SRStorageClass.COMPREHENSIVE.value
    assert plain.file_meta.MediaStorageSOPClassUID == SRStorageClass.COMPREHENSIVE.value
    assert plain.SOPInstanceUID == comprehensive_sr_uid(three_d.SOPInstanceUID)
    assert plain.SOPInstanceUID != three_d.SOPInstanceUID
    assert plain.SeriesInstanceUID == three_d.SeriesInstanceUID
    with pytest.raises(ValueError, match="not a Comprehensive 3D SR"):
        as_comprehensive_sr(plain)
    with pytest.raises(ValueError, match="SOP class"):
        read_sr(make_dx())
