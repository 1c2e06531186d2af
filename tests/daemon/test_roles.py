"""``radflag serve --roles``: each process runs only its roles; together they do the whole job."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.app import Radflag
from daemon.cli import main
from daemon.models import LoadedModel
from db.models import AuditEvent, Process, Study
from tests.daemon.conftest import dcmsend, make_settings, wait_until
from tests.dicom_io.conftest import make_dx, save

pytestmark = pytest.mark.dcmtk


def _state(app: Radflag) -> str | None:
    with app.sessions() as s:
        return s.scalars(select(Study.state)).first()


def test_listener_process_and_worker_process_split_the_work(
    tmp_path: Path, tiny_models: list[LoadedModel]
) -> None:
    settings = make_settings(tmp_path, None)
    front = Radflag(settings, models=[], roles=("listener", "scheduler"))
    front.start()
    back: Radflag | None = None
    try:
        assert front.models == [] and not front.worker._thread.is_alive()
        assert dcmsend(front.port, save(make_dx(), tmp_path / "dx.dcm")).returncode == 0
        wait_until(lambda: _state(front) == "READY", what="study READY")
        time.sleep(1.0)
        assert _state(front) == "READY"  # no worker role: nobody claims it

        back = Radflag(settings, models=tiny_models, roles=("worker",))
        back.start()
        wait_until(lambda: _state(front) == "DONE", what="study DONE")
        with front.sessions() as s:
            procs = {p.id: p.roles for p in s.scalars(select(Process))}
            claimed = s.scalars(
                select(AuditEvent).where(AuditEvent.event_type == "STUDY_CLAIMED")
            ).one()
            received = s.scalars(
                select(AuditEvent).where(AuditEvent.event_type == "INSTANCE_RECEIVED")
            ).one()
        assert procs == {front.worker_id: "listener,scheduler", back.worker_id: "worker"}
        assert claimed.actor == f"worker:{back.worker_id}"
        assert received.process_id == front.worker_id
    finally:
        if back is not None:
            back.stop()
        front.stop()


def test_unknown_role_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--roles", "listener,cook"])
    assert exc.value.code == 2
    assert "cook" in capsys.readouterr().err
