"""Spool: atomic durable writes, safe paths, quarantine."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filewriter import write_dataset

from dicom_io import spool as spool_module
from dicom_io.spool import Spool, SpoolError
from tests.dicom_io.conftest import make_dx


def test_path_for_layout_and_validation(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.path_for("1.2", "1.2.3", "1.2.3.4") == tmp_path.resolve() / "1.2/1.2.3/1.2.3.4.dcm"
    for bad in ("../1.2", "1.2/3", "", "1..2", "1.2.", "a.b", "1" * 65):
        with pytest.raises(ValueError, match="sop_uid"):
            spool.path_for("1.2", "1.2.3", bad)
    with pytest.raises(ValueError, match="study_uid"):
        spool.path_for("..", "1.2", "1.2")


def test_write_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    ds = make_dx()
    path = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)

    size = spool.write(ds, ds.file_meta, path)

    assert size == path.stat().st_size
    back = dcmread(path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    assert list(path.parent.iterdir()) == [path]


def test_write_encoded_matches_dataset_encoding(tmp_path: Path) -> None:
    from pydicom.filebase import DicomBytesIO

    spool = Spool(tmp_path)
    ds = make_dx()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    path = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)

    spool.write_encoded(ds.file_meta, buffer.getvalue(), path)

    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)


def test_write_outside_root_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    ds = make_dx()
    with pytest.raises(ValueError, match="outside"):
        spool.write(ds, ds.file_meta, tmp_path / "elsewhere.dcm")


def test_out_of_space_leaves_original_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    original = make_dx(seed=1)
    path = spool.path_for(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
    )
    spool.write(original, original.file_meta, path)
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spool_module.os, "fsync", full_disk)
    replacement = make_dx(seed=2)
    with pytest.raises(SpoolError) as info:
        spool.write(replacement, replacement.file_meta, path)

    assert info.value.out_of_space
    assert isinstance(info.value.__cause__, OSError)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_other_write_error_is_not_out_of_space(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ds = make_dx()
    del ds.file_meta.TransferSyntaxUID  # cannot be encoded as a PS3.10 file
    path = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    with pytest.raises(SpoolError) as info:
        spool.write(ds, ds.file_meta, path)
    assert not info.value.out_of_space
    assert not path.exists()
    assert not list(path.parent.iterdir())


def test_quarantine_moves_file_and_records_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    bad = tmp_path / "s" / "bad.dcm"
    bad.write_bytes(b"not dicom")

    target = spool.quarantine(bad, "cannot decode pixel data")
    again = tmp_path / "s" / "bad.dcm"
    again.write_bytes(b"also bad")
    second = spool.quarantine(again, "second")

    assert not bad.exists()
    assert target.parent == spool.quarantine_dir
    assert target.read_bytes() == b"not dicom"
    assert second != target and second.read_bytes() == b"also bad"
    note = target.with_name(target.name + ".reason.txt").read_text()
    assert note.startswith("cannot decode pixel data\n")


def test_quarantine_missing_file_raises(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError):
        spool.quarantine(tmp_path / "nope.dcm", "x")


def test_sweep_removes_only_old_temp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old = tmp_path / "1.2" / ".1.2.3.dcm.abc.tmp"
    new = tmp_path / "1.2" / ".1.2.4.dcm.def.tmp"
    old.parent.mkdir()
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (0, 0))

    assert spool.sweep_temp_files(min_age_s=60) == 1
    assert not old.exists() and new.exists()
