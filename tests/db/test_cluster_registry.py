"""Process registry, heartbeat-renewed leases by the database clock, advisory locks (issue 12)."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from daemon.worker import LeaseKeeper
from db.clock import db_now
from db.cluster import (
    heartbeat,
    list_processes,
    new_identity,
    reclaim_dead,
    register,
    relativize_instance_paths,
)
from db.ingest import NewInstance, PatientIdPolicy, record_instance
from db.locks import cluster_singleton
from db.models import AuditEvent, Instance, Process, Study, utcnow
from db.queue import ClaimedStudy, claim_next, mark_ready, renew_lease

POLICY = PatientIdPolicy(key=b"k" * 32)


def _claimed(sessions: sessionmaker[Session], owner: str, path: str = "a/b.dcm") -> ClaimedStudy:
    record_instance(
        sessions,
        NewInstance(
            sop_instance_uid="1.2.3.4.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            study_instance_uid="1.2.3.4",
            series_instance_uid="1.2.3.4.0",
            modality="DX",
            patient_id=None,
            calling_ae="MOD",
            peer_host="127.0.0.1",
            path=path,
            size_bytes=1,
            transfer_syntax_uid=None,
        ),
        POLICY,
        now=utcnow() - timedelta(seconds=5),
    )
    mark_ready(sessions, quiet_period_s=1.0)
    claim = claim_next(sessions, owner, lease_s=30)
    assert claim is not None
    return claim


def _expiry(sessions: sessionmaker[Session]) -> object:
    with sessions() as s:
        return s.scalars(select(Study.lease_expires_at)).one()


def test_db_now_is_the_servers_clock(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        assert abs((db_now(s) - utcnow()).total_seconds()) < 5  # same machine here


def test_heartbeat_renews_the_lease_until_the_work_ends(sessions: sessionmaker[Session]) -> None:
    claim = _claimed(sessions, "w1")
    before = _expiry(sessions)
    with LeaseKeeper(sessions, claim, lease_s=30, interval_s=0.2) as keeper:
        time.sleep(0.7)
    assert keeper.renewals >= 2 and not keeper.lost
    after = _expiry(sessions)
    assert after > before  # type: ignore[operator]
    time.sleep(0.4)
    assert _expiry(sessions) == after  # stopped with the work
    assert renew_lease(sessions, claim, 30) is True
    with sessions.begin() as s:  # another process took it over
        s.execute(update(Study).values(lease_owner="w2"))
    assert renew_lease(sessions, claim, 30) is False


def test_restart_reclaims_its_dead_incarnation_at_once(sessions: sessionmaker[Session]) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = new_identity(["worker"], "cfg")
    dead = type(dead)(**{**vars(dead), "id": f"{dead.host}:{gone.pid}:dead", "pid": gone.pid})
    register(sessions, dead, max_attempts=3)
    _claimed(sessions, dead.id)

    me = new_identity(["worker", "scheduler"], "cfg")
    assert register(sessions, me, max_attempts=3) == ["1.2.3.4"]

    with sessions() as s:
        study = s.scalars(select(Study)).one()
        row = s.get(Process, dead.id)
        events = {e.event_type: e for e in s.scalars(select(AuditEvent))}
    assert study.state == "READY" and study.lease_owner is None
    assert row is not None and row.stop_reason == "pid gone on restart"
    assert events["LEASE_RECLAIMED"].process_id is None  # no serve process in this test
    assert events["PROCESS_DEAD"].detail["pid"] == gone.pid


def test_silent_process_is_declared_dead_after_one_lease(
    sessions: sessionmaker[Session],
) -> None:
    other = new_identity(["worker"], "other-host-cfg")
    other = type(other)(**{**vars(other), "host": "elsewhere", "id": "elsewhere:1:x"})
    me = new_identity(["scheduler"], "cfg")
    register(sessions, other, max_attempts=3)
    register(sessions, me, max_attempts=3)
    _claimed(sessions, other.id)
    assert reclaim_dead(sessions, me, lease_s=30, max_attempts=3) == []  # still beating
    with sessions.begin() as s:
        s.execute(
            update(Process)
            .where(Process.id == other.id)
            .values(heartbeat_at=db_now(s) - timedelta(seconds=31))
        )
    [view] = [p for p in list_processes(sessions, lease_s=30) if p.id == other.id]
    assert not view.alive and view.studies_held == ("1.2.3.4",)
    assert reclaim_dead(sessions, me, lease_s=30, max_attempts=3) == ["1.2.3.4"]
    assert heartbeat(sessions, other) is False  # it learns it had been declared dead
    with sessions() as s:
        assert s.scalars(select(Study.state)).one() == "READY"


def test_absolute_paths_are_made_relative_to_the_spool_root(
    sessions: sessionmaker[Session],
) -> None:
    root = "/var/lib/radflag/spool"
    _claimed(sessions, "w1", path=f"{root}/1.2.3.4/1.2.3.4.0/1.2.3.4.1.dcm")
    assert relativize_instance_paths(sessions, Path(root)) == 1
    assert relativize_instance_paths(sessions, Path(root)) == 0
    with sessions() as s:
        assert s.scalars(select(Instance.path)).one() == "1.2.3.4/1.2.3.4.0/1.2.3.4.1.dcm"


@pytest.mark.postgres
def test_advisory_lock_admits_one_process_at_a_time(postgres_url: str) -> None:
    from db.engine import make_engine

    a: Engine = make_engine(postgres_url)
    b: Engine = make_engine(postgres_url)
    try:
        with cluster_singleton(a, "job") as first, cluster_singleton(b, "job") as second:
            assert first and not second
        with cluster_singleton(b, "job") as again:
            assert again
    finally:
        a.dispose()
        b.dispose()


def test_radflag_cluster_lists_live_processes_and_what_they_hold(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon.cli import main

    me = new_identity(["listener", "worker"], "cfg")
    register(sessions, me, max_attempts=3)
    _claimed(sessions, me.id)
    cfg = tmp_path / "radflag.toml"
    cfg.write_text(f'[database]\nurl = "{db_url}"\n')
    assert main(["cluster", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert me.id in out and "listener,worker" in out and "alive" in out
    assert "1 studies" in out and "1.2.3.4" in out
    assert main(["cluster", "--config", str(cfg), "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["studies_held"] == ["1.2.3.4"] and row["pid"] == me.pid
