"""Losing the database: the listener answers 0xA700 and keeps nothing; the worker backs off."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

import daemon.worker as worker_module
from daemon.sink import DatabaseSink
from daemon.worker import Worker
from db.engine import make_engine, make_session_factory
from db.ingest import PatientIdPolicy
from db.queue import ClaimedStudy
from dicom_io.scp import Listener, ListenerConfig
from dicom_io.spool import Spool
from tests.dicom_io.conftest import SCP_AE, make_dx, save
from tests.dicom_io.test_scp import storescu

UNREACHABLE = "postgresql+psycopg://radflag@127.0.0.1:1/radflag?connect_timeout=2"


@pytest.mark.dcmtk
def test_listener_without_database_answers_a700_and_keeps_nothing(tmp_path: Path) -> None:
    engine = make_engine(UNREACHABLE)
    spool = Spool(tmp_path / "spool")
    sink = DatabaseSink(make_session_factory(engine), PatientIdPolicy(key=b"k"), spool.root)
    config = ListenerConfig(
        ae_title=SCP_AE,
        host="127.0.0.1",
        port=0,
        acse_timeout_s=10,
        dimse_timeout_s=20,
        network_timeout_s=20,
    )
    listener = Listener(config, spool, sink)
    listener.start()
    try:
        sent = storescu(listener.port, save(make_dx(), tmp_path / "dx.dcm"), options=("-v",))
    finally:
        listener.stop(grace_s=2)
        engine.dispose()
    assert sent.returncode != 0
    assert "outofresources" in (sent.stdout + sent.stderr).lower()  # 0xA700
    assert not [p for p in spool.root.rglob("*") if p.is_file()]


class _NeverCalled:
    def process(self, claim: ClaimedStudy) -> None:
        raise AssertionError("nothing can be claimed without a database")


def test_worker_stops_claiming_and_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[float] = []

    def failing_claim(*_args: object, **_kwargs: object) -> None:
        attempts.append(time.monotonic())
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(worker_module, "claim_next", failing_claim)
    worker = Worker(
        "w",
        make_session_factory(make_engine(UNREACHABLE)),
        _NeverCalled(),
        lease_s=30,
        poll_interval_s=0.1,
    )
    worker.start()
    time.sleep(3.5)
    assert worker.stop(timeout_s=5)
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    # 0.1, 0.2, 0.4, 0.8, 1.6 s...: a handful of tries, not one every poll interval (~35)
    assert 3 <= len(attempts) <= 7, gaps
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
