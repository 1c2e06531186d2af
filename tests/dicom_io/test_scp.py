"""Listener tests against real peers (DCMTK storescu/echoscu, pynetdicom SCU)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, MRImageStorage
from pynetdicom import AE

from dicom_io import statuses
from dicom_io.scp import ListenerConfig, ListenerEventKind
from tests.conftest import shared_path
from tests.dicom_io.conftest import (
    SCP_AE,
    RunningListener,
    make_dx,
    require_tool,
    save,
    start_listener,
)

pytestmark = pytest.mark.dcmtk


def storescu(
    port: int,
    *files: Path,
    calling: str = "SENDER",
    called: str = SCP_AE,
    options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("storescu"), *options, "-aet", calling, "-aec", called]
    cmd += ["127.0.0.1", str(port)]
    return subprocess.run(
        [*cmd, *map(str, files)], capture_output=True, text=True, timeout=60, check=False
    )


def spooled_files(running: RunningListener) -> list[Path]:
    return sorted(p for p in running.spool.root.rglob("*.dcm") if "quarantine" not in p.parts)


def test_storescu_dx_is_spooled_and_recorded(
    tmp_path: Path, running_listener: RunningListener
) -> None:
    ds = make_dx()
    source = save(ds, tmp_path / "dx.dcm")

    proc = storescu(running_listener.port, source)

    assert proc.returncode == 0, proc.stderr
    [instance] = running_listener.sink.stored
    assert instance.sop_instance_uid == ds.SOPInstanceUID
    assert instance.study_instance_uid == ds.StudyInstanceUID
    assert instance.series_instance_uid == ds.SeriesInstanceUID
    assert instance.modality == "DX"
    assert instance.patient_id == "PID-0001"
    assert instance.calling_ae == "SENDER"
    assert instance.peer_host == "127.0.0.1"
    expected = running_listener.spool.path_for(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert instance.path == expected
    assert instance.size_bytes == expected.stat().st_size
    stored = dcmread(expected)
    assert stored.file_meta.SourceApplicationEntityTitle == "SENDER"
    assert stored.file_meta.TransferSyntaxUID == instance.transfer_syntax_uid
    np.testing.assert_array_equal(stored.pixel_array, ds.pixel_array)
    assert spooled_files(running_listener) == [expected]
    assert not list(running_listener.spool.root.rglob("*.tmp"))


@pytest.mark.shared
def test_storescu_jpeg2000_keeps_transfer_syntax(running_listener: RunningListener) -> None:
    source = shared_path("dicom", "chest-real", "files", "JPEG2KLossless_1s_1f_u_16_16.dcm")
    original = dcmread(source)

    # one presentation context offering J2K lossless *and* native syntaxes: the listener
    # must pick the compressed one so the sender keeps its compression
    proc = storescu(running_listener.port, source, options=("-xv", "+C"))

    assert proc.returncode == 0, proc.stderr
    [instance] = running_listener.sink.stored
    assert instance.transfer_syntax_uid == JPEG2000Lossless
    stored = dcmread(instance.path)
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert stored.PixelData == original.PixelData
    assert stored.pixel_array.shape == (1416, 1420)


def test_echoscu(running_listener: RunningListener) -> None:
    proc = subprocess.run(
        [
            require_tool("echoscu"),
            "-aet",
            "SENDER",
            "-aec",
            SCP_AE,
            "127.0.0.1",
            str(running_listener.port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert not running_listener.sink.stored


def test_unknown_calling_ae_is_rejected(tmp_path: Path) -> None:
    running = start_listener(tmp_path, allowed=("PACS",))
    try:
        source = save(make_dx(), tmp_path / "dx.dcm")
        proc = storescu(running.port, source, calling="INTRUDER")
        allowed = storescu(running.port, source, calling="PACS")
    finally:
        running.listener.stop(grace_s=2)

    assert proc.returncode != 0
    assert "calling ae title not recognized" in (proc.stdout + proc.stderr).lower()
    assert allowed.returncode == 0, allowed.stderr
    assert [i.calling_ae for i in running.sink.stored] == ["PACS"]
    rejects = [d for k, d in running.events if k == ListenerEventKind.ASSOCIATION_REJECTED]
    assert rejects == [
        {
            "calling_ae": "INTRUDER",
            "peer_host": "127.0.0.1",
            "reason": "calling AE title not recognized",
        }
    ]


def test_wrong_called_ae_is_rejected(tmp_path: Path, running_listener: RunningListener) -> None:
    source = save(make_dx(), tmp_path / "dx.dcm")

    proc = storescu(running_listener.port, source, called="SOMEONEELSE")

    assert proc.returncode != 0
    assert "called ae title not recognized" in (proc.stdout + proc.stderr).lower()
    assert not running_listener.sink.stored
    assert not spooled_files(running_listener)


def test_sink_failure_answers_out_of_resources_and_removes_file(
    tmp_path: Path, running_listener: RunningListener
) -> None:
    running_listener.sink.fail = True
    source = save(make_dx(), tmp_path / "dx.dcm")

    proc = storescu(running_listener.port, source, options=("-v",))

    assert proc.returncode != 0
    assert "refused: outofresources" in (proc.stdout + proc.stderr).lower()
    assert not spooled_files(running_listener)
    assert not list(running_listener.spool.root.rglob("*.tmp"))
    failures = [d for k, d in running_listener.events if k == ListenerEventKind.STORE_FAILED]
    assert [d["status"] for d in failures] == [statuses.OUT_OF_RESOURCES]


def test_duplicate_with_failing_sink_keeps_original(
    tmp_path: Path, running_listener: RunningListener
) -> None:
    ds = make_dx()
    source = save(ds, tmp_path / "dx.dcm")
    first = storescu(running_listener.port, source)
    assert first.returncode == 0, first.stderr
    [path] = spooled_files(running_listener)

    running_listener.sink.fail = True
    second = storescu(running_listener.port, source, options=("-v",))

    assert second.returncode != 0
    assert "refused: outofresources" in (second.stdout + second.stderr).lower()
    assert spooled_files(running_listener) == [path]
    np.testing.assert_array_equal(dcmread(path).pixel_array, ds.pixel_array)


def test_duplicate_is_reported_to_sink_and_stored_once(
    tmp_path: Path, running_listener: RunningListener
) -> None:
    source = save(make_dx(), tmp_path / "dx.dcm")
    for _ in range(2):
        proc = storescu(running_listener.port, source)
        assert proc.returncode == 0, proc.stderr
    assert len(running_listener.sink.stored) == 2
    assert len(running_listener.sink.seen) == 1
    assert len(spooled_files(running_listener)) == 1


def test_unsupported_sop_class_is_refused(
    tmp_path: Path, running_listener: RunningListener
) -> None:
    source = save(make_dx(sop_class_uid=MRImageStorage, modality="MR"), tmp_path / "mr.dcm")

    proc = storescu(running_listener.port, source)

    assert proc.returncode != 0
    assert not running_listener.sink.stored
    assert not spooled_files(running_listener)


def _pynetdicom_store(port: int, ds_to_send: Dataset) -> int:
    ae = AE(ae_title="SENDER")
    syntax = str(ds_to_send.file_meta.TransferSyntaxUID)
    ae.add_requested_context(str(ds_to_send.SOPClassUID), [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds_to_send)
        return int(rsp.Status)
    finally:
        assoc.release()


def test_missing_study_uid_answers_dataset_mismatch(running_listener: RunningListener) -> None:
    ds = make_dx()
    del ds.StudyInstanceUID

    status = _pynetdicom_store(running_listener.port, ds)

    assert status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert not running_listener.sink.stored
    assert not spooled_files(running_listener)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_traversal_uid_is_refused(running_listener: RunningListener) -> None:
    ds = make_dx()
    ds.SeriesInstanceUID = "../../etc"

    status = _pynetdicom_store(running_listener.port, ds)

    assert status == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert not spooled_files(running_listener)


def test_stop_closes_the_port(tmp_path: Path) -> None:
    running = start_listener(tmp_path)
    port = running.port
    running.listener.stop(grace_s=1)
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="ae_title"):
        ListenerConfig(ae_title="THIS_AE_TITLE_IS_TOO_LONG")
    with pytest.raises(ValueError, match="allowed_calling_aes"):
        ListenerConfig(ae_title="OK", allowed_calling_aes=("BAD\\AE",))
    with pytest.raises(ValueError, match="port"):
        ListenerConfig(ae_title="OK", port=70000)


@pytest.mark.parametrize(
    ("options", "expected_syntax"),
    [
        (("-xd",), "1.2.840.10008.1.2.1.99"),  # deflated explicit VR LE
        (("-xi",), "1.2.840.10008.1.2"),  # implicit VR LE
    ],
)
def test_received_transfer_syntax_is_kept(
    tmp_path: Path,
    running_listener: RunningListener,
    options: tuple[str, ...],
    expected_syntax: str,
) -> None:
    ds = make_dx(rows=40, columns=30)
    source = save(ds, tmp_path / "dx.dcm")

    proc = storescu(running_listener.port, source, options=options)

    assert proc.returncode == 0, proc.stderr
    [instance] = running_listener.sink.stored
    stored = dcmread(instance.path)
    assert instance.transfer_syntax_uid == expected_syntax
    assert stored.file_meta.TransferSyntaxUID == expected_syntax
    np.testing.assert_array_equal(stored.pixel_array, ds.pixel_array)


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("CR_hip_RG2_jpegls_lossless.dcm", ("-xt", "+C")),
        ("CR_hip_RG2_jpeg_lossless_sv1.dcm", ("-xs", "+C")),
        ("CR_hip_RG2_jpeg_extended.dcm", ("-xx", "+C")),
        ("CR_extremity_RG3_j2k_lossless.dcm", ("-xv", "+C")),
    ],
)
def test_compressed_cr_is_stored_as_received(
    running_listener: RunningListener, name: str, options: tuple[str, ...]
) -> None:
    source = shared_path("dicom", "transfer-syntax-zoo", "files", name)
    original = dcmread(source)

    proc = storescu(running_listener.port, source, options=options)

    assert proc.returncode == 0, proc.stderr
    [instance] = running_listener.sink.stored
    stored = dcmread(instance.path)
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData
