"""Ingest throughput: ~20 x 2048x2048 16-bit images (measurement, not a timed assertion).

Run with ``pytest tests/dicom_io/test_ingest_throughput.py -s -m slow`` to see the figures.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_io.scu import Destination, send_datasets
from tests.dicom_io.conftest import SCP_AE, make_dx, require_tool, save, start_listener

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

N_IMAGES = 20
SIZE = 2048


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("big")
    template = make_dx(rows=SIZE, columns=SIZE)
    study = generate_uid()
    files = []
    for i in range(N_IMAGES):
        template.StudyInstanceUID = study
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        files.append(save(template, folder / f"img{i:02d}.dcm"))
    return files


@pytest.mark.parametrize("max_pdu_bytes", [0, 16384])
def test_storescu_ingest_rate(tmp_path: Path, big_files: list[Path], max_pdu_bytes: int) -> None:
    running = start_listener(tmp_path, max_pdu_bytes=max_pdu_bytes)
    try:
        start = time.perf_counter()
        proc = subprocess.run(
            [
                require_tool("storescu"),
                "-aet",
                "SENDER",
                "-aec",
                SCP_AE,
                "127.0.0.1",
                str(running.port),
                *map(str, big_files),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        elapsed_s = time.perf_counter() - start
    finally:
        running.listener.stop(grace_s=5)
    assert proc.returncode == 0, proc.stderr
    assert len(running.sink.stored) == N_IMAGES
    mb = sum(f.stat().st_size for f in big_files) / 1e6
    print(
        f"\nstorescu -> listener (max PDU {max_pdu_bytes or 'unlimited'}): "
        f"{N_IMAGES / elapsed_s:.1f} images/s, {mb / elapsed_s:.0f} MB/s"
    )


def test_pynetdicom_ingest_rate(tmp_path: Path, big_files: list[Path]) -> None:
    from pydicom import dcmread

    datasets = [dcmread(f) for f in big_files]
    running = start_listener(tmp_path)
    try:
        start = time.perf_counter()
        send_datasets(Destination(SCP_AE, "127.0.0.1", running.port), datasets, timeout_s=120)
        elapsed_s = time.perf_counter() - start
    finally:
        running.listener.stop(grace_s=5)
    assert len(running.sink.stored) == N_IMAGES
    print(f"\npynetdicom SCU -> listener: {N_IMAGES / elapsed_s:.1f} images/s")
