"""Data sets streamed to the spool while they arrive (Spool.open_incoming / place_incoming)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import create_file_meta

from dicom_io import incoming as incoming_module
from dicom_io.spool import INCOMING_PREFIX, Spool, SpoolError
from tests.dicom_io.conftest import make_dx


def _encoded(seed: int = 0) -> tuple[bytes, object]:
    ds = make_dx(rows=64, columns=64, seed=seed)
    meta = create_file_meta(
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax=ds.file_meta.TransferSyntaxUID,
    )
    meta.SourceApplicationEntityTitle = "MODALITY"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue(), meta


def _stream(
    spool: Spool, meta: object, data: bytes, chunk: int = 1000
) -> incoming_module.IncomingFile:
    incoming = spool.open_incoming(meta)  # type: ignore[arg-type]
    for start in range(0, len(data), chunk):
        incoming.write(memoryview(data)[start : start + chunk])
    return incoming


def _temp_files(spool: Spool) -> list[Path]:
    return list(spool.root.glob(f"{INCOMING_PREFIX}*"))


def test_streamed_file_equals_the_file_written_at_once(tmp_path: Path) -> None:
    data, meta = _encoded()
    streamed, at_once = Spool(tmp_path / "a"), Spool(tmp_path / "b")
    target = streamed.path_for("1.2", "1.2.3", "1.2.3.4")

    placed = streamed.place_incoming(_stream(streamed, meta, data), target)
    reference = at_once.place_encoded(meta, data, at_once.path_for("1.2", "1.2.3", "1.2.3.4"))  # type: ignore[arg-type]

    assert placed.created and not placed.kept_aside
    assert placed.path.read_bytes() == reference.path.read_bytes()
    assert placed.size == reference.size == placed.path.stat().st_size
    assert dcmread(placed.path).file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert _temp_files(streamed) == []


def test_a_second_copy_is_dropped_when_identical_and_kept_aside_when_not(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data, meta = _encoded()
    other, _ = _encoded(seed=1)
    target = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    spool.place_incoming(_stream(spool, meta, data), target)

    same = spool.place_incoming(_stream(spool, meta, data), target)
    differs = spool.place_incoming(_stream(spool, meta, other), target)

    assert (same.path, same.created, same.kept_aside) == (target, False, False)
    assert differs.kept_aside and differs.path.parent == spool.duplicates_dir
    assert target.read_bytes().endswith(data)  # the original is never replaced
    assert differs.path.read_bytes().endswith(other)
    assert _temp_files(spool) == []


def test_a_write_error_while_receiving_is_kept_and_refused_at_placing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    data, meta = _encoded()
    incoming = spool.open_incoming(meta)  # type: ignore[arg-type]
    real_write = os.write
    calls = []

    def full_disk(fd: int, buffer: object) -> int:
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, buffer)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", full_disk)
    for start in range(0, len(data), 1000):
        incoming.write(data[start : start + 1000])  # never raises
    monkeypatch.undo()

    assert incoming.out_of_space
    assert len(calls) == 3  # nothing written after the error
    with pytest.raises(SpoolError) as refused:
        spool.place_incoming(incoming, spool.path_for("1.2", "1.2.3", "1.2.3.4"))
    assert refused.value.out_of_space
    incoming.close()
    assert not spool.path_for("1.2", "1.2.3", "1.2.3.4").exists()
    assert _temp_files(spool) == []


def test_discard_removes_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data, meta = _encoded()
    incoming = _stream(spool, meta, data[:5000])
    assert _temp_files(spool) == [incoming.path]

    incoming.discard()
    incoming.discard()  # idempotent

    assert _temp_files(spool) == []


def test_writeback_is_started_while_receiving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step of received bytes is handed to writeback at once; the fsync still follows."""
    calls: list[tuple[str, int, int]] = []

    def writeback(fd: int, offset: int, nbytes: int) -> None:
        calls.append(("writeback", offset, nbytes))

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(("fsync", 0, 0))
        real_fsync(fd)

    monkeypatch.setattr(incoming_module, "start_writeback", writeback)
    monkeypatch.setattr(incoming_module, "WRITEBACK_STEP_BYTES", 2048)
    monkeypatch.setattr(os, "fsync", fsync)
    data, meta = _encoded()
    spool = Spool(tmp_path)
    incoming = _stream(spool, meta, data, chunk=1000)

    assert calls and all(kind == "writeback" for kind, _, _ in calls)  # while receiving
    assert calls[0][1] == 0
    for (_, offset, nbytes), (_, following, _) in zip(calls, calls[1:], strict=False):
        assert nbytes >= 2048 and following == offset + nbytes  # contiguous steps
    assert incoming.size - (calls[-1][1] + calls[-1][2]) < 2048  # only the tail is left

    placed = spool.place_incoming(incoming, spool.path_for("1.2", "1.2.3", "1.2.3.4"))

    assert ("fsync", 0, 0) in calls[-3:]  # the durable write still fsyncs the file
    assert placed.path.stat().st_size == incoming.size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux")
def test_linux_writeback_is_the_real_system_call(tmp_path: Path) -> None:
    assert incoming_module.start_writeback is not incoming_module._no_writeback
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 8192)
        incoming_module.start_writeback(fd, 0, 8192)  # accepted (a hint: never raises)
        incoming_module.start_writeback(-1, 0, 1)  # even on a bad descriptor
    finally:
        os.close(fd)
