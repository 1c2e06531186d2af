"""The process registry: which ``radflag serve`` processes are alive, and reclaiming the dead.

Every process registers a row in ``processes`` (host, pid, roles, start) and renews its
``heartbeat_at`` by the database clock every few seconds (:func:`heartbeat`). Death is noticed
two ways:

- at start-up, a process declares dead every earlier registration **on its own host** whose
  pid no longer runs (its own previous incarnation after ``kill -9``, a crash or a power cut)
  and gives their studies back to the queue at once (:func:`register`);
- any process with the scheduler role declares dead every process, on any host, whose heartbeat
  is older than one lease, and gives its studies back (:func:`reclaim_dead`).

So a crashed process's work is picked up within one lease by the others, and at once by its
own restart. Nothing is deleted: dead rows stay with ``stopped_at`` and ``stop_reason`` for the
audit trail and ``radflag cluster``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.clock import db_now
from db.models import Instance, Process, Study
from db.outbox import release_claims_of
from db.queue import release_studies_of
from db.states import StudyState

ROLES: tuple[str, ...] = ("listener", "worker", "sender", "scheduler")
"""Every role a process can run; ``radflag serve --roles`` picks a subset (default: all)."""


@dataclass(frozen=True)
class ProcessIdentity:
    """Who this process is: ``id`` is unique per start (``host:pid:nonce``)."""

    id: str
    host: str
    pid: int
    roles: tuple[str, ...]
    identity: str
    """Stable per host and configuration (same on every restart of the same service)."""


def new_identity(roles: Sequence[str], config_key: str) -> ProcessIdentity:
    """Return a fresh identity for this process.

    Parameters
    ----------
    roles
        The roles this process runs (a subset of :data:`ROLES`).
    config_key
        Something that tells this service's configuration apart from another one on the same
        host (e.g. the configuration file path and listener port).
    """
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; choose from {', '.join(ROLES)}")
    host = socket.gethostname()
    pid = os.getpid()
    stable = hashlib.sha256(f"{host}\0{config_key}".encode()).hexdigest()[:16]
    return ProcessIdentity(
        id=f"{host}:{pid}:{uuid.uuid4().hex[:8]}",
        host=host,
        pid=pid,
        roles=tuple(r for r in ROLES if r in roles),
        identity=stable,
    )


def pid_alive(pid: int) -> bool:
    """Return True when a process with ``pid`` runs on this host (signal 0 probe)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register(
    sessions: sessionmaker[Session],
    me: ProcessIdentity,
    *,
    max_attempts: int,
    detail: dict[str, object] | None = None,
) -> list[str]:
    """Register ``me`` and reclaim at once the work of dead processes on this host.

    A registration on this host that is not stopped and whose pid no longer runs (or is our
    own pid: reused after a reboot or in a container) is a dead previous incarnation.

    Returns
    -------
    list of str
        Study Instance UIDs given back to the queue.
    """
    reclaimed: list[str] = []
    with sessions.begin() as session:
        now = db_now(session)
        session.add(
            Process(
                id=me.id,
                host=me.host,
                pid=me.pid,
                roles=",".join(me.roles),
                identity=me.identity,
                started_at=now,
                heartbeat_at=now,
                detail=dict(detail or {}),
            )
        )
        audit(
            session,
            AuditEventType.PROCESS_STARTED,
            actor=f"daemon:{me.id}",
            at=now,
            detail={"host": me.host, "pid": me.pid, "roles": list(me.roles)},
        )
        previous = session.scalars(
            select(Process)
            .where(Process.host == me.host, Process.id != me.id, Process.stopped_at.is_(None))
            .with_for_update(skip_locked=True)
        ).all()
        for proc in previous:
            if proc.pid != me.pid and pid_alive(proc.pid):
                continue
            reclaimed += _declare_dead(
                session, proc, "pid gone on restart", me, max_attempts=max_attempts, now=now
            )
    return reclaimed


def heartbeat(sessions: sessionmaker[Session], me: ProcessIdentity) -> bool:
    """Renew ``me``'s heartbeat by the database clock.

    Returns
    -------
    bool
        False when another process had declared us dead (our leases were given back); the
        registration is revived, the work we still hold will be refused as lease lost.
    """
    with sessions.begin() as session:
        proc = session.get(Process, me.id, with_for_update=True)
        if proc is None:
            return False
        proc.heartbeat_at = db_now(session)
        alive = proc.stopped_at is None
        proc.stopped_at = None
        proc.stop_reason = None
        return alive


def mark_stopped(sessions: sessionmaker[Session], me: ProcessIdentity, reason: str) -> None:
    """Record a graceful stop of ``me`` (its leases were already handed back)."""
    with sessions.begin() as session:
        session.execute(
            update(Process)
            .where(Process.id == me.id)
            .values(stopped_at=db_now(session), stop_reason=reason)
        )


def reclaim_dead(
    sessions: sessionmaker[Session], me: ProcessIdentity, *, lease_s: float, max_attempts: int
) -> list[str]:
    """Declare dead every process whose heartbeat is older than ``lease_s``; give back its work.

    Safe to run in several processes at once (the process rows are locked ``SKIP LOCKED``).

    Returns
    -------
    list of str
        Study Instance UIDs given back to the queue (or failed after ``max_attempts``).
    """
    reclaimed: list[str] = []
    with sessions.begin() as session:
        now = db_now(session)
        stale = session.scalars(
            select(Process)
            .where(
                Process.stopped_at.is_(None),
                Process.heartbeat_at < now - timedelta(seconds=lease_s),
                Process.id != me.id,
            )
            .with_for_update(skip_locked=True)
        ).all()
        for proc in stale:
            reclaimed += _declare_dead(
                session, proc, "heartbeat expired", me, max_attempts=max_attempts, now=now
            )
    return reclaimed


def _declare_dead(
    session: Session,
    proc: Process,
    reason: str,
    me: ProcessIdentity,
    *,
    max_attempts: int,
    now: datetime,
) -> list[str]:
    proc.stopped_at = now
    proc.stop_reason = reason
    actor = f"scheduler:{me.id}"
    studies = release_studies_of(session, proc.id, max_attempts=max_attempts, now=now, actor=actor)
    deliveries = release_claims_of(session, proc.id, reason=f"sender process {reason}")
    audit(
        session,
        AuditEventType.PROCESS_DEAD,
        actor=actor,
        at=now,
        detail={
            "dead_process": proc.id,
            "host": proc.host,
            "pid": proc.pid,
            "reason": reason,
            "last_heartbeat": proc.heartbeat_at.isoformat(),
            "studies_given_back": len(studies),
            "deliveries_given_back": len(deliveries),
        },
    )
    return studies


@dataclass(frozen=True)
class ProcessView:
    """One row of ``radflag cluster``: a process, whether it is alive, and what it holds."""

    id: str
    host: str
    pid: int
    roles: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float
    alive: bool
    stop_reason: str | None
    studies_held: tuple[str, ...]


def list_processes(
    sessions: sessionmaker[Session], *, lease_s: float, include_stopped: bool = False
) -> list[ProcessView]:
    """Return the registered processes with heartbeat age (database clock) and held studies."""
    with sessions.begin() as session:
        now = db_now(session)
        query = select(Process).order_by(Process.started_at)
        if not include_stopped:
            query = query.where(Process.stopped_at.is_(None))
        procs = session.scalars(query).all()
        held: dict[str, list[str]] = {}
        for owner, uid in session.execute(
            select(Study.lease_owner, Study.study_instance_uid).where(
                Study.state == StudyState.PROCESSING.value, Study.lease_owner.is_not(None)
            )
        ):
            held.setdefault(str(owner), []).append(str(uid))
        return [
            ProcessView(
                id=p.id,
                host=p.host,
                pid=p.pid,
                roles=p.roles,
                started_at=p.started_at,
                heartbeat_at=p.heartbeat_at,
                heartbeat_age_s=(now - p.heartbeat_at).total_seconds(),
                alive=p.stopped_at is None and (now - p.heartbeat_at).total_seconds() <= lease_s,
                stop_reason=p.stop_reason,
                studies_held=tuple(held.get(p.id, ())),
            )
            for p in procs
        ]


def relativize_instance_paths(sessions: sessionmaker[Session], spool_root: Path) -> int:
    """Rewrite absolute instance paths below ``spool_root`` as paths relative to it.

    Older versions stored absolute, host-local paths; a second host mounting the shared spool
    elsewhere could not read them. Idempotent; paths outside the root are left alone.

    Returns
    -------
    int
        Number of rows rewritten.
    """
    prefix = str(Path(spool_root).resolve()).rstrip("/") + "/"
    with sessions.begin() as session:
        rows = session.execute(
            update(Instance)
            .where(Instance.path.startswith(prefix, autoescape=True))
            .values(path=func.substr(Instance.path, len(prefix) + 1))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(rows, "rowcount", 0) or 0)
