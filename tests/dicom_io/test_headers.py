"""Defensive header copies (dicom_io.headers) and the SR/SC built from messy real headers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_io.headers import repair_source
from dicom_io.sr import AlgorithmInfo, FindingResult, build_sr, result_uids
from tests.conftest import shared_path
from tests.dicom_io.conftest import require_tool

ALGORITHM = AlgorithmInfo("radflag-pneumonia", "1.0", "radflag project", "ab" * 32, 0.5)
FINDING = FindingResult("233604007", "SCT", "Pneumonia", probability=0.7, present=True)
JIS_NAME = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"


def _real_dx() -> Dataset:
    """The real 16-bit chest DX of chest-real, header only."""
    path = shared_path("dicom", "chest-real", "files", "JPEG2KLossless_1s_1f_u_16_16.dcm")
    return dcmread(path, stop_before_pixels=True)


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    value += b" " if len(value) % 2 else b""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


@pytest.mark.shared
@pytest.mark.parametrize(
    ("tag", "vr", "raw", "expected", "action"),
    [
        (0x00100030, "DA", b"3b5d5c3712955042212316173ccf37be", "", "emptied"),
        (0x00100030, "DA", b"1970.01.31", "19700131", "repaired"),
        (0x00080020, "DA", b"20201301", "", "emptied"),
        (0x00080030, "TM", b"10:20:30", "102030", "repaired"),
        (0x00080030, "TM", b"25:61:00", "", "emptied"),
        (0x0008002A, "DT", b"2020-01-01T10:00", "", "emptied"),
        (0x00101010, "AS", b"045y", "045Y", "repaired"),
        (0x00101010, "AS", b"45", "", "emptied"),
        (0x00100040, "CS", b"male", "M", "repaired"),
        (0x00100040, "CS", b"X", "", "emptied"),
        (0x00080050, "SH", b"A" * 40, "A" * 16, "truncated"),
        (0x00081030, "LO", b"B" * 300, "B" * 64, "truncated"),
        (0x00100010, "PN", b"A^B^C^D^E^F^G", "A^B^C^D^E", "truncated"),
        (0x00100010, "PN", b"Doe\n^John", "Doe^John", "repaired"),
        (0x00200011, "IS", b"1.5", "", "emptied"),
        (0x00280030, "DS", b"0.1mm\\0.1mm", "", "removed"),
    ],
)
def test_invalid_values_are_repaired_or_emptied_and_reported(
    tag: int, vr: str, raw: bytes, expected: str, action: str
) -> None:
    ds = _real_dx()
    _raw(ds, tag, vr, raw)
    repaired = repair_source(ds)
    value = repaired.dataset[tag].value
    assert ("" if value is None else str(value)) == expected
    keyword = repaired.dataset[tag].keyword
    assert [r.action for r in repaired.repairs if r.keyword.startswith(keyword)][0] == action
    assert all(raw.decode("latin-1") not in str(r) for r in repaired.repairs)  # no values
    assert ds[tag].value != value or expected == raw.decode()  # the original is untouched


@pytest.mark.shared
def test_absent_type2_added_private_and_pixels_dropped() -> None:
    ds = _real_dx()
    for keyword in ("PatientName", "PatientBirthDate", "StudyTime", "AccessionNumber"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x10, "LO", "secret")
    out = repair_source(ds).dataset
    for keyword in ("PatientName", "PatientBirthDate", "StudyTime", "AccessionNumber"):
        assert keyword in out and not out[keyword].value
    assert not [e for e in out if e.tag.is_private] and "PixelData" not in out


@pytest.mark.shared
@pytest.mark.parametrize(
    ("charset", "raw", "name"),
    [
        ("ISO_IR 100", "Müller^Jürgen".encode("latin-1"), "Müller^Jürgen"),
        ("ISO_IR 192", "Ærøskøbing^李".encode(), "Ærøskøbing^李"),
        (["", "ISO 2022 IR 87"], JIS_NAME, "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ],
)
def test_names_in_any_character_set_survive_into_a_valid_sr(
    tmp_path: Path, charset: str | list[str], raw: bytes, name: str
) -> None:
    ds = _real_dx()
    ds.SpecificCharacterSet = charset
    ds.set_original_encoding(False, True, convert_encodings(charset))  # as sent
    _raw(ds, 0x00100010, "PN", raw)
    series_uid, sop_uid = result_uids(str(ds.StudyInstanceUID), "m", "1", "SR")
    sr = build_sr(
        [ds], FINDING, ALGORITHM, series_instance_uid=series_uid, sop_instance_uid=sop_uid
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    assert str(back.PatientName) == name
    assert back.SpecificCharacterSet == "ISO_IR 192"
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    assert [line for line in out.stderr.splitlines() if line.startswith("Error")] == []


@pytest.mark.shared
def test_sr_of_an_old_cr_without_orientation_and_imager_spacing(tmp_path: Path) -> None:
    """Issue 9's crash: highdicom's image library read absent/empty descriptors."""
    ds = _real_dx()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = "CR"
    for keyword in ("ImagerPixelSpacing", "PatientOrientation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelSpacing = [0, 0]
    series_uid, sop_uid = result_uids(str(ds.StudyInstanceUID), "m", "1", "SR")
    sr = build_sr(
        [ds], FINDING, ALGORITHM, series_instance_uid=series_uid, sop_instance_uid=sop_uid
    )
    ds.PatientOrientation = ""  # present but empty: the IndexError of the report
    sr2 = build_sr(
        [ds], FINDING, ALGORITHM, series_instance_uid=series_uid, sop_instance_uid=sop_uid
    )
    ds.PatientOrientation = ["P", "F"]
    ds.ImagerPixelSpacing = [0.139, 0.14]
    sr3 = build_sr(
        [ds], FINDING, ALGORITHM, series_instance_uid=series_uid, sop_instance_uid=sop_uid
    )

    def descriptors(doc: Dataset) -> set[str]:
        return {
            str(e.value[0].CodeMeaning)
            for e in doc.iterall()
            if e.keyword == "ConceptNameCodeSequence"
        }

    assert "Horizontal Pixel Spacing" not in descriptors(sr)
    assert "Patient Orientation Row" not in descriptors(sr2)
    assert {"Patient Orientation Row", "Horizontal Pixel Spacing"} <= descriptors(sr3)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    assert [line for line in out.stderr.splitlines() if line.startswith("Error")] == []
