"""The study work queue: completion by quiet period, claims with leases, and outcomes.

A worker claims a READY study with a lease (``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL;
SQLite transactions start with ``BEGIN IMMEDIATE`` so claims are serialised). Leases are short
(``worker.lease_s``, 30 s) and renewed by a heartbeat while the work is in progress
(:func:`renew_lease`); every expiry is computed by the *database's* clock (:func:`db.clock.db_now`)
so hosts whose clocks drift agree on it. A study held by a dead process goes back to the queue
at once when the death is known (:func:`release_studies_of`, called by :mod:`db.cluster`) and
otherwise when its lease expires. Every outcome checks that the worker still holds the lease: a
late instance re-opens the study and the result of the stale run is discarded
(``RESULT_SUPERSEDED``), never written over newer state.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.clock import db_now
from db.models import Instance, Study, utcnow
from db.states import StudyEvent, StudyState, next_state


@dataclass(frozen=True)
class ClaimedStudy:
    """A typed work ticket: one study a worker holds the lease on."""

    study_id: int
    study_instance_uid: str
    lease_owner: str
    lease_expires_at: datetime
    attempt: int
    calling_ae: str | None
    instances: tuple[ClaimedInstance, ...]


@dataclass(frozen=True)
class ClaimedInstance:
    """An instance of a claimed study: where its file is and what it is."""

    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    path: str


class LeaseLost(RuntimeError):
    """The worker no longer holds the study's lease (late instance, expiry or another worker)."""


def transition(
    session: Session,
    study: Study,
    event: StudyEvent,
    *,
    audit_type: AuditEventType,
    actor: str,
    now: datetime,
    detail: dict[str, Any] | None = None,
) -> StudyState:
    """Apply ``event`` to ``study`` and add the audit row, in the caller's transaction.

    Raises
    ------
    db.states.InvalidTransition
        When the event is not allowed in the study's current state.
    """
    previous = StudyState(study.state)
    new = next_state(previous, event)
    study.state = new.value
    study.updated_at = now
    audit(
        session,
        audit_type,
        actor=actor,
        study=study,
        at=now,
        detail={"from_state": previous.value, "to_state": new.value, **(detail or {})},
    )
    return new


def mark_ready(
    sessions: sessionmaker[Session], quiet_period_s: float, *, now: datetime | None = None
) -> list[str]:
    """Move every RECEIVING study quiet for ``quiet_period_s`` to READY.

    Returns
    -------
    list of str
        Study Instance UIDs that became ready.
    """
    ready: list[str] = []
    with sessions.begin() as session:
        when = now or db_now(session)
        cutoff = when - timedelta(seconds=quiet_period_s)
        studies = session.scalars(
            select(Study)
            .where(Study.state == StudyState.RECEIVING.value, Study.last_received_at <= cutoff)
            .order_by(Study.last_received_at)
            .with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            transition(
                session,
                study,
                StudyEvent.QUIET_PERIOD_ELAPSED,
                audit_type=AuditEventType.STUDY_READY,
                actor="scheduler",
                now=when,
                detail={"quiet_period_s": quiet_period_s},
            )
            study.ready_at = when
            ready.append(study.study_instance_uid)
    return ready


def claim_next(
    sessions: sessionmaker[Session],
    worker_id: str,
    lease_s: float,
    *,
    now: datetime | None = None,
) -> ClaimedStudy | None:
    """Claim the oldest READY study for ``worker_id`` with a lease of ``lease_s`` seconds.

    The lease expires ``lease_s`` after the database's current time; :func:`renew_lease`
    extends it while the work is in progress.
    """
    with sessions.begin() as session:
        when = now or db_now(session)
        study = session.scalars(
            select(Study)
            .where(Study.state == StudyState.READY.value)
            .order_by(Study.ready_at, Study.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if study is None:
            return None
        study.processing_attempts += 1
        study.lease_owner = worker_id
        study.lease_expires_at = when + timedelta(seconds=lease_s)
        transition(
            session,
            study,
            StudyEvent.CLAIMED,
            audit_type=AuditEventType.STUDY_CLAIMED,
            actor=f"worker:{worker_id}",
            now=when,
            detail={"attempt": study.processing_attempts, "lease_s": lease_s},
        )
        instances = session.scalars(
            select(Instance)
            .where(Instance.study_id == study.id, Instance.quarantined.is_(False))
            .order_by(Instance.id)
        ).all()
        return ClaimedStudy(
            study_id=study.id,
            study_instance_uid=study.study_instance_uid,
            lease_owner=worker_id,
            lease_expires_at=study.lease_expires_at,
            attempt=study.processing_attempts,
            calling_ae=study.calling_ae,
            instances=tuple(
                ClaimedInstance(
                    instance_id=i.id,
                    sop_instance_uid=i.sop_instance_uid,
                    sop_class_uid=i.sop_class_uid,
                    modality=i.modality,
                    path=i.path,
                )
                for i in instances
            ),
        )


def load_leased(session: Session, claim: ClaimedStudy) -> Study:
    """Return the claimed study locked for update, checking the lease is still ours.

    Raises
    ------
    LeaseLost
        When the study moved on (late instance, expired lease taken by another worker).
    """
    study = session.scalars(select(Study).where(Study.id == claim.study_id).with_for_update()).one()
    if study.state != StudyState.PROCESSING.value or study.lease_owner != claim.lease_owner:
        raise LeaseLost(
            f"study {claim.study_instance_uid} is {study.state}, lease "
            f"{'held by another worker' if study.lease_owner else 'released'}"
        )
    return study


def release_lease(study: Study) -> None:
    """Clear the lease fields of ``study``."""
    study.lease_owner = None
    study.lease_expires_at = None


def finish_not_applicable(
    sessions: sessionmaker[Session], claim: ClaimedStudy, reasons: dict[str, Any]
) -> None:
    """Record that no loaded model applies to any instance of the study."""
    now = utcnow()
    with sessions.begin() as session:
        study = load_leased(session, claim)
        release_lease(study)
        study.finished_at = now
        transition(
            session,
            study,
            StudyEvent.NOTHING_TO_CLASSIFY,
            audit_type=AuditEventType.STUDY_NOT_APPLICABLE,
            actor=f"worker:{claim.lease_owner}",
            now=now,
            detail={"reasons": reasons},
        )


def finish_failed(
    sessions: sessionmaker[Session],
    claim: ClaimedStudy,
    reason: str,
    *,
    quarantined: dict[int, str] | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record a permanent processing failure with its reason (no result is sent).

    ``quarantined`` maps instance ids to the path their file was moved to.
    """
    now = utcnow()
    with sessions.begin() as session:
        study = load_leased(session, claim)
        for instance_id, new_path in (quarantined or {}).items():
            instance = session.get(Instance, instance_id)
            if instance is not None:
                instance.quarantined = True
                instance.path = new_path
                audit(
                    session,
                    AuditEventType.INSTANCE_QUARANTINED,
                    actor=f"worker:{claim.lease_owner}",
                    study=study,
                    sop_instance_uid=instance.sop_instance_uid,
                    at=now,
                    detail={"path": new_path, "reason": (detail or {}).get("reason") or reason},
                )
        release_lease(study)
        study.failure_reason = reason
        study.finished_at = now
        transition(
            session,
            study,
            StudyEvent.PROCESSING_FAILED,
            audit_type=AuditEventType.STUDY_FAILED,
            actor=f"worker:{claim.lease_owner}",
            now=now,
            detail={"reason": reason, **(detail or {})},
        )


def retry_later(
    sessions: sessionmaker[Session], claim: ClaimedStudy, reason: str, *, max_attempts: int
) -> StudyState:
    """Give the study back to the queue after a retryable error, or fail it after too many tries."""
    now = utcnow()
    with sessions.begin() as session:
        study = load_leased(session, claim)
        release_lease(study)
        actor = f"worker:{claim.lease_owner}"
        if study.processing_attempts >= max_attempts:
            study.failure_reason = f"gave up after {study.processing_attempts} attempts: {reason}"
            study.finished_at = now
            return transition(
                session,
                study,
                StudyEvent.PROCESSING_FAILED,
                audit_type=AuditEventType.STUDY_FAILED,
                actor=actor,
                now=now,
                detail={"reason": study.failure_reason},
            )
        study.ready_at = now
        return transition(
            session,
            study,
            StudyEvent.RETRYABLE_ERROR,
            audit_type=AuditEventType.PROCESSING_RETRY,
            actor=actor,
            now=now,
            detail={"reason": reason, "attempt": study.processing_attempts},
        )


def renew_lease(sessions: sessionmaker[Session], claim: ClaimedStudy, lease_s: float) -> bool:
    """Extend the lease on ``claim`` to ``lease_s`` after the database's now (the heartbeat).

    Returns
    -------
    bool
        False when the lease is no longer ours (late instance, expiry, reclaimed): the work in
        progress will be discarded by :func:`load_leased`, so the heartbeat can stop.
    """
    with sessions.begin() as session:
        expires = db_now(session) + timedelta(seconds=lease_s)
        result = session.execute(
            update(Study)
            .where(
                Study.id == claim.study_id,
                Study.state == StudyState.PROCESSING.value,
                Study.lease_owner == claim.lease_owner,
            )
            .values(lease_expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))


def _give_back(
    session: Session,
    study: Study,
    *,
    max_attempts: int,
    now: datetime,
    actor: str,
    audit_type: AuditEventType,
    reason: str,
) -> None:
    """Return a PROCESSING study whose holder is gone to READY, or FAILED after too many tries."""
    owner = study.lease_owner
    release_lease(study)
    if study.processing_attempts >= max_attempts:
        study.failure_reason = f"{reason} {study.processing_attempts} times; giving up"
        study.finished_at = now
        transition(
            session,
            study,
            StudyEvent.PROCESSING_FAILED,
            audit_type=AuditEventType.STUDY_FAILED,
            actor=actor,
            now=now,
            detail={"reason": study.failure_reason, "lease_owner": owner},
        )
        return
    study.ready_at = now
    transition(
        session,
        study,
        StudyEvent.LEASE_EXPIRED,
        audit_type=audit_type,
        actor=actor,
        now=now,
        detail={"lease_owner": owner, "attempt": study.processing_attempts, "reason": reason},
    )


def expire_leases(
    sessions: sessionmaker[Session],
    *,
    max_attempts: int,
    now: datetime | None = None,
    actor: str = "scheduler",
) -> list[str]:
    """Return studies whose lease expired (database clock) to READY, or FAILED after retries.

    A worker that died or hung without being noticed by the process registry loses its study
    this way, within one lease.
    """
    expired: list[str] = []
    with sessions.begin() as session:
        when = now or db_now(session)
        studies = session.scalars(
            select(Study)
            .where(Study.state == StudyState.PROCESSING.value, Study.lease_expires_at < when)
            .with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            _give_back(
                session,
                study,
                max_attempts=max_attempts,
                now=when,
                actor=actor,
                audit_type=AuditEventType.LEASE_EXPIRED,
                reason="lease expired",
            )
            expired.append(study.study_instance_uid)
    return expired


def release_studies_of(
    session: Session, owner: str, *, max_attempts: int, now: datetime, actor: str
) -> list[str]:
    """In the caller's transaction: give back every study leased by the dead process ``owner``.

    Returns
    -------
    list of str
        Study Instance UIDs given back (``LEASE_RECLAIMED``) or failed after ``max_attempts``.
    """
    studies = session.scalars(
        select(Study)
        .where(Study.state == StudyState.PROCESSING.value, Study.lease_owner == owner)
        .with_for_update(skip_locked=True)
    ).all()
    for study in studies:
        _give_back(
            session,
            study,
            max_attempts=max_attempts,
            now=now,
            actor=actor,
            audit_type=AuditEventType.LEASE_RECLAIMED,
            reason="holder process died",
        )
    return [s.study_instance_uid for s in studies]


def release_own_leases(sessions: sessionmaker[Session], worker_id: str) -> list[str]:
    """On shutdown: hand every study leased by ``worker_id`` back to the queue."""
    now = utcnow()
    released: list[str] = []
    with sessions.begin() as session:
        studies = session.scalars(
            select(Study).where(
                Study.state == StudyState.PROCESSING.value, Study.lease_owner == worker_id
            )
        ).all()
        for study in studies:
            release_lease(study)
            study.ready_at = now
            transition(
                session,
                study,
                StudyEvent.RETRYABLE_ERROR,
                audit_type=AuditEventType.PROCESSING_RETRY,
                actor=f"worker:{worker_id}",
                now=now,
                detail={"reason": "daemon shutting down"},
            )
            released.append(study.study_instance_uid)
    return released


def quiet_left(
    sessions: sessionmaker[Session], study_uids: Collection[str], quiet_period_s: float
) -> dict[str, float]:
    """Return the seconds of quiet period left for each of ``study_uids`` still RECEIVING.

    Computed on the database's clock (:func:`db.clock.db_now`), which is the clock
    :func:`mark_ready` compares with; 0 or less means quiet already (not marked READY yet).
    Studies in any other state, or unknown, are left out.
    """
    if not study_uids:
        return {}
    with sessions() as session:
        now = db_now(session)
        rows = session.execute(
            select(Study.study_instance_uid, Study.last_received_at).where(
                Study.study_instance_uid.in_(sorted(study_uids)),
                Study.state == StudyState.RECEIVING.value,
            )
        ).all()
    return {uid: (last - now).total_seconds() + quiet_period_s for uid, last in rows}
