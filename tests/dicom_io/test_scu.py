"""C-STORE client against DCMTK storescp and against our own listener."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from dicom_io import statuses
from dicom_io.scu import Destination, SendError, send_datasets
from dicom_io.sr import AlgorithmInfo, FindingResult, build_sr
from tests.dicom_io.conftest import (
    SCP_AE,
    RunningListener,
    free_port,
    make_dx,
    require_tool,
)

pytestmark = pytest.mark.dcmtk


def _wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out_dir = tmp_path / "received"
    out_dir.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [require_tool("storescp"), "-aet", "DEST", "-od", str(out_dir), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        yield port, out_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def make_sr() -> Dataset:
    source = make_dx()
    return build_sr(
        [source],
        FindingResult("233604007", "SCT", "Pneumonia", probability=0.7, present=True),
        AlgorithmInfo("m", "1", "radflag project", "00" * 32, 0.5),
        series_instance_uid="1.2.826.0.1.3680043.8.498.1",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1.1",
    )


def test_send_sr_to_storescp(storescp: tuple[int, Path]) -> None:
    port, out_dir = storescp
    sr = make_sr()
    image = make_dx()

    send_datasets(Destination("DEST", "127.0.0.1", port), [sr, image], calling_ae="RADFLAG")

    deadline = time.monotonic() + 10
    files: list[Path] = []
    while time.monotonic() < deadline and len(files) < 2:
        files = sorted(out_dir.iterdir())
        time.sleep(0.05)
    received = {str(dcmread(f).SOPInstanceUID) for f in files}
    assert received == {"1.2.826.0.1.3680043.8.498.1.1", str(image.SOPInstanceUID)}


def test_closed_port_is_retryable() -> None:
    with pytest.raises(SendError) as info:
        send_datasets(Destination("DEST", "127.0.0.1", free_port()), [make_dx()], timeout_s=5)
    assert info.value.retryable and info.value.association_failed
    assert "refused or unreachable" in str(info.value)


def test_silent_peer_is_reported_as_timed_out() -> None:
    with socket.socket() as silent:  # accepts (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        dest = Destination("DEST", "127.0.0.1", silent.getsockname()[1])
        with pytest.raises(SendError) as info:
            send_datasets(dest, [make_dx()], timeout_s=1.5)
    assert info.value.retryable and info.value.association_failed
    assert "timed out after" in str(info.value)


def test_rejected_association_is_permanent(tmp_path: Path) -> None:
    from tests.dicom_io.conftest import start_listener

    running = start_listener(tmp_path, allowed=("PACS",))
    try:
        with pytest.raises(SendError) as info:
            send_datasets(
                Destination(SCP_AE, "127.0.0.1", running.port),
                [make_dx()],
                calling_ae="STRANGER",
                timeout_s=10,
            )
    finally:
        running.listener.stop(grace_s=2)
    assert not info.value.retryable
    assert "rejected" in str(info.value)


def test_out_of_resources_status_is_retryable(running_listener: RunningListener) -> None:
    running_listener.sink.fail = True
    with pytest.raises(SendError) as info:
        send_datasets(
            Destination(SCP_AE, "127.0.0.1", running_listener.port), [make_dx()], timeout_s=10
        )
    assert info.value.retryable
    assert info.value.status == statuses.OUT_OF_RESOURCES
    assert "with status 0xA700 (Failure)" in str(info.value)


def test_unsupported_sop_class_is_permanent(running_listener: RunningListener) -> None:
    mr = make_dx(sop_class_uid=MRImageStorage, modality="MR")
    with pytest.raises(SendError) as info:
        send_datasets(Destination(SCP_AE, "127.0.0.1", running_listener.port), [mr], timeout_s=10)
    assert not info.value.retryable


def test_send_to_listener_stores_all(running_listener: RunningListener) -> None:
    images = [make_dx(seed=i) for i in range(3)]
    send_datasets(Destination(SCP_AE, "127.0.0.1", running_listener.port), images)
    assert {i.sop_instance_uid for i in running_listener.sink.stored} == {
        str(ds.SOPInstanceUID) for ds in images
    }


def test_destination_validation() -> None:
    with pytest.raises(ValueError, match="port"):
        Destination("DEST", "127.0.0.1", 0)
    with pytest.raises(ValueError, match="ae_title"):
        Destination("", "127.0.0.1", 104)
