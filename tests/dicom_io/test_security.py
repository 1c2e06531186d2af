"""Association policy and failure statuses: allow-list bound to addresses, association limit,
unparsable and mismatching data sets, full disk (a real small tmpfs) and the free-space reserve.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from dicom_io import statuses
from dicom_io.peers import CallingAePolicy, PeerRule, parse_peer_rule
from dicom_io.scp import ListenerEventKind
from dicom_io.spool import TEMP_SUFFIX
from tests.dicom_io.conftest import (
    SCP_AE,
    RunningListener,
    make_dx,
    require_tool,
    save,
    start_listener,
)

pytestmark = pytest.mark.dcmtk


def _run(tool: str, port: int, *args: str, calling: str = "MODALITY") -> str:
    argv = [require_tool(tool), "-v", "-aet", calling, "-aec", SCP_AE, "-to", "10"]
    proc = subprocess.run(
        [*argv, "127.0.0.1", str(port), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}"


@contextlib.contextmanager
def _listener(tmp_path: Path, **kwargs: object) -> Iterator[RunningListener]:
    running = start_listener(tmp_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield running
    finally:
        running.listener.stop(grace_s=2)


def test_peer_rules_parse_titles_and_networks() -> None:
    assert parse_peer_rule("PACS") == PeerRule("PACS")
    assert parse_peer_rule(" PACS@10.1.2.3 ") == PeerRule(
        "PACS", ipaddress.ip_network("10.1.2.3/32")
    )
    assert parse_peer_rule("CR1@10.20.0.0/16").network == ipaddress.ip_network("10.20.0.0/16")
    assert parse_peer_rule("ME@HOME") == PeerRule("ME@HOME")  # not an address: part of the title
    with pytest.raises(ValueError, match="allowed_calling_aes"):
        parse_peer_rule("A_TITLE_FAR_TOO_LONG@10.0.0.1")
    policy = CallingAePolicy.from_entries(["PACS@10.0.0.0/8", "PACS@::1", "CT"])
    assert policy.rejection("PACS", "10.3.4.5") is None
    assert policy.rejection("PACS", "::1") is None
    assert policy.rejection("PACS", "::ffff:10.3.4.5") is None  # IPv4-mapped IPv6
    wrong_host = "calling AE title not allowed from this address"
    assert policy.rejection("PACS", "192.168.1.1") == wrong_host
    assert policy.rejection("CT", "192.168.1.1") is None
    assert policy.rejection("MR", "10.3.4.5") == "calling AE title not recognized"
    assert CallingAePolicy().rejection("ANYONE", "1.2.3.4") is None


def test_calling_ae_bound_to_another_address_is_rejected(tmp_path: Path) -> None:
    source = save(make_dx(), tmp_path / "dx.dcm")
    with _listener(tmp_path, allowed=("PACS@10.9.9.9", "MODALITY")) as running:
        from_wrong_host = _run("storescu", running.port, str(source), calling="PACS")
        unknown = _run("echoscu", running.port, calling="INTRUDER")
        allowed = _run("storescu", running.port, str(source), calling="MODALITY")

    assert "rc=0" not in from_wrong_host
    assert "calling ae title not recognized" in from_wrong_host.lower()
    assert "calling ae title not recognized" in unknown.lower()
    assert allowed.startswith("rc=0"), allowed
    assert [i.calling_ae for i in running.sink.stored] == ["MODALITY"]
    rejects = [d for k, d in running.events if k == ListenerEventKind.ASSOCIATION_REJECTED]
    assert [(d["calling_ae"], d["reason"]) for d in rejects] == [
        ("PACS", "calling AE title not allowed from this address"),
        ("INTRUDER", "calling AE title not recognized"),
    ]


def test_calling_ae_bound_to_its_network_is_accepted(tmp_path: Path) -> None:
    source = save(make_dx(), tmp_path / "dx.dcm")
    with _listener(tmp_path, allowed=("PACS@127.0.0.0/8",)) as running:
        out = _run("storescu", running.port, str(source), calling="PACS")
    assert out.startswith("rc=0"), out
    assert len(running.sink.stored) == 1


def test_association_limit_rejects_transiently(tmp_path: Path) -> None:
    with _listener(tmp_path, max_associations=1) as running:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", running.port, ae_title=SCP_AE)
        try:
            assert held.is_established
            refused = _run("echoscu", running.port)
        finally:
            held.release()
        after = _run("echoscu", running.port)

    assert "rc=0" not in refused
    assert "local limit exceeded" in refused.lower()
    assert after.startswith("rc=0"), after


def _send_raw(port: int, sop_uid: str, encoded: bytes, tmp_path: Path) -> int:
    """C-STORE ``encoded`` bytes as they are, in a CR context; return the status.

    pynetdicom's documented ``STORE_SEND_CHUNKED_DATASET`` mode sends a file's data set bytes
    without decoding them (the caller enables it with monkeypatch).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"raw-{sop_uid}.dcm"
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(fh), meta, enforce_standard=True)
        fh.write(encoded)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


@pytest.fixture
def raw_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_unparsable_data_set_answers_cannot_understand(tmp_path: Path, raw_sending: None) -> None:
    # A sequence of undefined length whose first item has no item tag: the parser fails.
    broken = b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.1\x00"
    broken += b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
    broken += b"\x12\x34\x56\x78\x08\x00\x00\x00abcdefgh"
    noise = bytes(range(256)) * 4  # parses as some private element: no SOP Class UID
    with _listener(tmp_path) as running:
        status = _send_raw(running.port, "1.2.3.4.5", broken, tmp_path)
        noise_status = _send_raw(running.port, "1.2.3.4.6", noise, tmp_path)
        echo = _run("echoscu", running.port)

    assert status == statuses.CANNOT_UNDERSTAND
    assert noise_status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert echo.startswith("rc=0")
    assert not running.sink.stored
    assert not list(running.spool.root.rglob("*.dcm"))


def test_data_set_of_another_sop_class_answers_mismatch(tmp_path: Path, raw_sending: None) -> None:
    ds = make_dx()  # DX data set, sent in a CR presentation context
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    with _listener(tmp_path) as running:
        status = _send_raw(running.port, ds.SOPInstanceUID, buffer.getvalue(), tmp_path)

    assert status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert not running.sink.stored
    failed = [d for k, d in running.events if k == ListenerEventKind.STORE_FAILED]
    assert failed and failed[0]["status"] == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB tmpfs (needs root / CAP_SYS_ADMIN; skips otherwise)."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "radflag-test", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (ENOSPC is also tested in test_spool): {proc.stderr}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], timeout=20, check=False)


def test_full_disk_answers_out_of_resources_and_keeps_serving(
    tmp_path: Path, small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = make_dx(rows=1024, columns=2048)  # 4 MiB of pixels: does not fit in 3 MiB
    small = make_dx()
    with _listener(tmp_path, spool_dir=small_tmpfs / "spool") as running:
        with caplog.at_level(logging.INFO):
            full = _run("storescu", running.port, str(save(big, tmp_path / "big.dcm")))
        fits = _run("storescu", running.port, str(save(small, tmp_path / "small.dcm")))

    assert "refused: outofresources" in full.lower(), full  # 0xA700
    failed = [d for k, d in running.events if k == ListenerEventKind.STORE_FAILED]
    assert [(d["status"], d["reason"]) for d in failed] == [
        (statuses.OUT_OF_RESOURCES, "out of disk space")
    ]
    assert fits.startswith("rc=0"), fits
    assert [i.sop_instance_uid for i in running.sink.stored] == [small.SOPInstanceUID]
    spooled = sorted(p.name for p in running.spool.root.rglob("*") if p.is_file())
    assert spooled == [f"{small.SOPInstanceUID}.dcm"]  # nothing half-written, no temp file
    assert not any(TEMP_SUFFIX in p for p in spooled)
    assert "Test^Patient" not in caplog.text and "PID-0001" not in caplog.text


def test_free_space_reserve_refuses_before_writing(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    reserve = shutil.disk_usage(spool_dir).free + 2**40  # more than the disk has
    ds = make_dx()
    with _listener(tmp_path, min_free_bytes=reserve) as running:
        out = _run("storescu", running.port, str(save(ds, tmp_path / "dx.dcm")))

    assert "refused: outofresources" in out.lower(), out  # 0xA700
    failed = [d for k, d in running.events if k == ListenerEventKind.STORE_FAILED]
    assert [(d["status"], d["reason"]) for d in failed] == [
        (statuses.OUT_OF_RESOURCES, "out of disk space")
    ]
    assert not running.sink.stored
    assert not [p for p in running.spool.root.rglob("*") if p.is_file()]


def test_signed_and_partial_bits_survive_the_listener(tmp_path: Path) -> None:
    # Bits Stored 12 in 16 allocated, signed: the stored file decodes to the same values.
    from dicom_io.reader import read_image

    values = np.array([[-2048, -1, 0, 2047]], dtype=np.int16).repeat(4, axis=0)
    ds = make_dx(rows=4, columns=4)
    ds.PixelRepresentation = 1
    ds.PixelData = values.tobytes()
    with _listener(tmp_path) as running:
        out = _run("storescu", running.port, str(save(ds, tmp_path / "signed.dcm")))
    assert out.startswith("rc=0"), out
    image = read_image(running.sink.stored[0].path)
    assert image.pixels.dtype.kind == "i"
    np.testing.assert_array_equal(image.pixels, values)
