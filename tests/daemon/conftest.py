"""Fixtures for daemon tests: a tiny real model bundle, an in-process radflag, a PACS stand-in."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
)
from sqlalchemy.orm import Session

from daemon.app import Radflag
from daemon.models import LoadedModel
from daemon.settings import Settings
from db.models import Delivery, Study, utcnow
from model.bundle import ModelCard, build_network, load_bundle, save_bundle
from model.infer import Classifier
from model.preprocess import PreprocessSpec
from tests.peers.dcmtk import dcmsend as peers_dcmsend
from tests.peers.dcmtk import dcmtk_available
from tests.peers.dcmtk import storescu as peers_storescu


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (randomly initialised, seeded) resnet10t bundle at 64 px: fast, deterministic."""
    torch.manual_seed(0)
    spec = PreprocessSpec(input_size=64, channels=1)
    net = build_network("resnet10t", spec)
    card = ModelCard(
        name="test-pneumonia",
        version="0.0.1-test",
        architecture="resnet10t",
        classes=["normal", "pneumonia"],
        positive_class="pneumonia",
        preprocessing=spec.to_dict(),
        threshold=0.5,
        modalities=["CR", "DX"],
        description="untrained network for tests",
    )
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    save_bundle(path, net, card)
    return path


@pytest.fixture(scope="session")
def tiny_models(tiny_bundle: Path) -> list[LoadedModel]:
    bundle = load_bundle(tiny_bundle)
    device = torch.device("cpu")
    return [LoadedModel(bundle=bundle, classifier=Classifier(bundle, device=device), device=device)]


TRAIL_TWO_IMAGES_SR_AND_SC = [
    "INSTANCE_RECEIVED",
    "INSTANCE_RECEIVED",
    "STUDY_READY",
    "STUDY_CLAIMED",
    "IMAGES_SELECTED",
    "DELIVERY_QUEUED",
    "DELIVERY_QUEUED",
    "STUDY_CLASSIFIED",
    "DELIVERY_SENT",
    "DELIVERY_SENT",
    "STUDY_DONE",
]
"""The audit trail of a two-image study classified and delivered as SR + SC to one PACS."""


@dataclass
class PacsStandIn:
    """A pynetdicom Storage SCP on 127.0.0.1 that keeps what it receives."""

    port: int
    received: list[Dataset] = field(default_factory=list)
    calling_aes: list[str] = field(default_factory=list)
    server: Any = None

    def wait_for(self, n: int, timeout_s: float = 60) -> list[Dataset]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.received) >= n:
                return self.received
            time.sleep(0.1)
        raise AssertionError(f"PACS received {len(self.received)} objects, expected {n}")


@contextmanager
def storage_scp(
    port: int, sop_classes: Sequence[str], *, ae_title: str = "PACS"
) -> Iterator[PacsStandIn]:
    """A pynetdicom Storage SCP on 127.0.0.1:``port`` (0: any free port) for ``sop_classes``."""
    ae = AE(ae_title=ae_title)
    for uid in sop_classes:
        ae.add_supported_context(
            uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless]
        )
    stand_in = PacsStandIn(port=port)
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with lock:
            stand_in.received.append(ds)
            stand_in.calling_aes.append(event.assoc.requestor.ae_title)
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    stand_in.server = server
    stand_in.port = server.server_address[1]
    try:
        yield stand_in
    finally:
        server.shutdown()


@pytest.fixture
def pacs() -> Iterator[PacsStandIn]:
    """A PACS stand-in that accepts both SR classes and Secondary Capture."""
    classes = [Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage]
    with storage_scp(0, classes) as stand_in:
        yield stand_in


def make_settings(tmp_path: Path, pacs_port: int | None, **sections: dict[str, Any]) -> Settings:
    """Settings for an in-process radflag on 127.0.0.1 with fast timers."""
    data: dict[str, Any] = {
        "listener": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5},
        "storage": {"spool_dir": str(tmp_path / "spool"), "results_dir": str(tmp_path / "results")},
        "database": {"url": f"sqlite:///{tmp_path / 'radflag.db'}"},
        "completion": {"quiet_period_s": 0.5, "check_interval_s": 0.2},
        "worker": {"device": "cpu", "poll_interval_s": 0.2},
        "delivery": {"backoff_base_s": 0.2, "backoff_max_s": 1.0, "check_interval_s": 0.2},
        "destinations": (
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
            if pacs_port
            else []
        ),
        "privacy": {"pseudonym_key": "test-key"},
    }
    for name, values in sections.items():
        if isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    return Settings.model_validate(data)


@pytest.fixture
def start_app(tiny_models: list[LoadedModel]) -> Iterator[Callable[[Settings], Radflag]]:
    apps: list[Radflag] = []

    def _start(settings: Settings) -> Radflag:
        app = Radflag(settings, models=tiny_models)
        app.start()
        apps.append(app)
        return app

    yield _start
    for app in apps:
        app.stop()


def _require_dcmtk() -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK not installed in /usr/bin")


def storescu(
    port: int, *files: Path, calling_ae: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    """Send uncompressed files to radflag with DCMTK ``storescu -v`` (prints each status)."""
    _require_dcmtk()
    return peers_storescu(port, files, called_aet="RADFLAG", calling_aet=calling_ae, timeout_s=120)


def dcmsend(
    port: int, *files: Path, calling_ae: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    """Send files to radflag with DCMTK ``dcmsend`` (the real, independent sender).

    ``dcmsend`` proposes each file's own transfer syntax (no decompression on the fly),
    as a modality or PACS forwarding stored images does.
    """
    _require_dcmtk()
    return peers_dcmsend(port, files, called_aet="RADFLAG", calling_aet=calling_ae, timeout_s=120)


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 60, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass(frozen=True)
class DueEntry:
    """One outbox entry due now, of a DELIVERING study of its own (to destination ``pacs``)."""

    study_uid: str
    sop_instance_uid: str
    payload_path: str
    port: int
    kind: str = "SR"


def add_due_entry(session: Session, entry: DueEntry) -> None:
    """Add ``entry``'s study and its PENDING outbox row to ``session``."""
    now = utcnow()
    study = Study(
        study_instance_uid=entry.study_uid,
        state="DELIVERING",
        first_received_at=now,
        last_received_at=now,
        updated_at=now,
    )
    session.add(study)
    session.flush()
    session.add(
        Delivery(
            study_id=study.id,
            destination="pacs",
            ae_title="PACS",
            host="127.0.0.1",
            port=entry.port,
            kind=entry.kind,
            sop_instance_uid=entry.sop_instance_uid,
            payload_path=entry.payload_path,
            state="PENDING",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
