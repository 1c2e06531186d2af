"""Fixtures for dicom_io tests: synthetic DICOM files, a fake sink, a running listener."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_io.scp import (
    InstanceSink,
    Listener,
    ListenerConfig,
    ReceivedInstance,
    SinkUnavailable,
)
from dicom_io.spool import Spool

DCMTK_BIN = Path("/usr/bin")
SCP_AE = "RADFLAG"


def require_tool(name: str) -> str:
    """Return the absolute path of a DCMTK/dicom3tools binary or skip the test."""
    path = DCMTK_BIN / name
    if not path.exists():
        pytest.skip(f"{path} not installed")
    return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_dx(
    *,
    rows: int = 64,
    columns: int = 48,
    study_uid: str | None = None,
    photometric: str = "MONOCHROME2",
    sop_class_uid: str = DigitalXRayImageStorageForPresentation,
    modality: str = "DX",
    seed: int = 0,
    **attrs: Any,
) -> Dataset:
    """A small, valid 16-bit single-frame DX (PS3.3 A.26) with file meta."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "radflag-tests"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.AcquisitionDeviceProcessingDescription = ""
    ds.DetectorType = "DIRECT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PixelData = pixels.tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class FakeSink(InstanceSink):
    """In-memory sink: records instances; can be told to fail like a database outage."""

    fail: bool = False
    stored: list[ReceivedInstance] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self, instance: ReceivedInstance) -> bool:
        with self.lock:
            if self.fail:
                raise SinkUnavailable("database unavailable (test)")
            self.stored.append(instance)
            is_new = instance.sop_instance_uid not in self.seen
            self.seen.add(instance.sop_instance_uid)
            return is_new


@dataclass
class RunningListener:
    listener: Listener
    spool: Spool
    sink: FakeSink
    events: list[tuple[str, dict[str, Any]]]

    @property
    def port(self) -> int:
        return self.listener.port

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def start_listener(
    tmp_path: Path,
    *,
    allowed: tuple[str, ...] = (),
    max_pdu_bytes: int = 0,
    spool_dir: Path | None = None,
    **config: Any,
) -> RunningListener:
    spool = Spool(spool_dir or tmp_path / "spool")
    sink = FakeSink()
    events: list[tuple[str, dict[str, Any]]] = []
    config = ListenerConfig(
        ae_title=SCP_AE,
        host="127.0.0.1",
        port=0,
        allowed_calling_aes=allowed,
        max_pdu_bytes=max_pdu_bytes,
        acse_timeout_s=10,
        dimse_timeout_s=20,
        network_timeout_s=20,
        **config,
    )
    listener = Listener(config, spool, sink, on_event=lambda k, d: events.append((k, d)))
    listener.start()
    return RunningListener(listener, spool, sink, events)


@pytest.fixture
def running_listener(tmp_path: Path) -> Iterator[RunningListener]:
    running = start_listener(tmp_path)
    try:
        yield running
    finally:
        running.listener.stop(grace_s=2)


@pytest.fixture
def dcmtk() -> None:
    if shutil.which("storescu", path=str(DCMTK_BIN)) is None:
        pytest.skip("DCMTK not installed")
