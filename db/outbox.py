"""The delivery outbox: due entries, attempts with exponential backoff, dead letters.

One entry per (result object, destination). The scheduled sender (``daemon.delivery``) takes
due PENDING entries, records every attempt, retries after ``base * 2**(n-1)`` seconds and
gives up after ``max_attempts`` (DEAD, the study DELIVERY_FAILED). Operators list, retry and
drop entries (``radflag outbox``). Result objects carry deterministic UIDs, so a re-sent
object replaces the earlier copy at the PACS: delivery is at-least-once on the wire and
exactly-once as the PACS sees it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.models import Delivery, DeliveryAttempt, Study, utcnow
from db.queue import transition
from db.states import StudyEvent, StudyState


class DeliveryState(enum.StrEnum):
    """Where an outbox entry is."""

    PENDING = "PENDING"
    SENT = "SENT"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class BackoffPolicy:
    """Retry schedule: ``base_s * 2**(attempt-1)`` capped at ``max_s``, dead after ``max_attempts``.

    Attempts are counted per outbox entry.
    """

    base_s: float = 10.0
    max_s: float = 600.0
    max_attempts: int = 10

    def delay_s(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return float(min(self.max_s, self.base_s * (2 ** max(0, attempts - 1))))


@dataclass(frozen=True)
class DueDelivery:
    """An outbox entry whose next attempt is due."""

    delivery_id: int
    study_id: int
    study_instance_uid: str
    destination: str
    ae_title: str
    host: str
    port: int
    kind: str
    sop_instance_uid: str
    payload_path: str
    attempts: int


def due_deliveries(
    sessions: sessionmaker[Session], *, now: datetime | None = None, limit: int = 50
) -> list[DueDelivery]:
    """Return PENDING entries whose next attempt time has come, oldest first."""
    when = now or utcnow()
    with sessions() as session:
        rows = session.execute(
            select(Delivery, Study.study_instance_uid)
            .join(Study, Study.id == Delivery.study_id)
            .where(Delivery.state == DeliveryState.PENDING.value, Delivery.next_attempt_at <= when)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
        ).all()
        return [
            DueDelivery(
                delivery_id=d.id,
                study_id=d.study_id,
                study_instance_uid=uid,
                destination=d.destination,
                ae_title=d.ae_title,
                host=d.host,
                port=d.port,
                kind=d.kind,
                sop_instance_uid=d.sop_instance_uid,
                payload_path=d.payload_path,
                attempts=d.attempts,
            )
            for d, uid in rows
        ]


def record_attempt(
    sessions: sessionmaker[Session],
    delivery_id: int,
    *,
    started_at: datetime,
    ok: bool,
    error: str | None,
    retryable: bool,
    policy: BackoffPolicy,
    actor: str = "outbox",
) -> DeliveryState:
    """Record one send attempt and move the entry (and, when all is sent, the study) on.

    A failure is retried after :meth:`BackoffPolicy.delay_s`; a permanent failure, or the last
    allowed attempt, makes the entry DEAD and the study DELIVERY_FAILED.

    Returns
    -------
    DeliveryState
        The entry's state after the attempt.
    """
    now = utcnow()
    with sessions.begin() as session:
        d = session.scalars(
            select(Delivery).where(Delivery.id == delivery_id).with_for_update()
        ).one()
        study = session.scalars(select(Study).where(Study.id == d.study_id).with_for_update()).one()
        if d.state != DeliveryState.PENDING.value:
            # Cancelled (superseded) while the send was under way: keep the history only.
            session.add(
                DeliveryAttempt(
                    delivery_id=d.id, started_at=started_at, finished_at=now, ok=ok, error=error
                )
            )
            return DeliveryState(d.state)
        d.attempts += 1
        session.add(
            DeliveryAttempt(
                delivery_id=d.id, started_at=started_at, finished_at=now, ok=ok, error=error
            )
        )
        detail = {
            "destination": d.destination,
            "kind": d.kind,
            "attempt": d.attempts,
            "ae_title": d.ae_title,
            "host": d.host,
            "port": d.port,
        }
        if ok:
            d.state = DeliveryState.SENT.value
            d.sent_at = now
            d.last_error = None
            d.next_attempt_at = None
            audit(
                session,
                AuditEventType.DELIVERY_SENT,
                actor=actor,
                study=study,
                sop_instance_uid=d.sop_instance_uid,
                at=now,
                detail=detail,
            )
            _maybe_finish_study(session, study, now, actor)
            return DeliveryState.SENT
        d.last_error = error
        if not retryable or d.attempts >= policy.max_attempts:
            d.state = DeliveryState.DEAD.value
            d.next_attempt_at = None
            audit(
                session,
                AuditEventType.DELIVERY_DEAD,
                actor=actor,
                study=study,
                sop_instance_uid=d.sop_instance_uid,
                at=now,
                detail={**detail, "error": error, "retryable": retryable},
            )
            if study.state == StudyState.DELIVERING.value:
                transition(
                    session,
                    study,
                    StudyEvent.DELIVERY_GAVE_UP,
                    audit_type=AuditEventType.STUDY_FAILED,
                    actor=actor,
                    now=now,
                    detail={"reason": f"delivery to {d.destination} failed: {error}"},
                )
                study.failure_reason = f"delivery to {d.destination} failed: {error}"
            return DeliveryState.DEAD
        delay = policy.delay_s(d.attempts)
        d.next_attempt_at = now + timedelta(seconds=delay)
        audit(
            session,
            AuditEventType.DELIVERY_ATTEMPT_FAILED,
            actor=actor,
            study=study,
            sop_instance_uid=d.sop_instance_uid,
            at=now,
            detail={**detail, "error": error, "retry_in_s": delay},
        )
        return DeliveryState.PENDING


def _maybe_finish_study(session: Session, study: Study, now: datetime, actor: str) -> None:
    if study.state != StudyState.DELIVERING.value:
        return
    open_count = session.scalar(
        select(func.count())
        .select_from(Delivery)
        .where(
            Delivery.study_id == study.id,
            Delivery.state.in_([DeliveryState.PENDING.value, DeliveryState.DEAD.value]),
        )
    )
    if open_count == 0:
        study.finished_at = now
        transition(
            session,
            study,
            StudyEvent.ALL_DELIVERED,
            audit_type=AuditEventType.STUDY_DONE,
            actor=actor,
            now=now,
        )


def pending_count(sessions: sessionmaker[Session]) -> int:
    """Return the outbox backlog (PENDING entries)."""
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.state == DeliveryState.PENDING.value)
            )
            or 0
        )


def replace_payload(
    sessions: sessionmaker[Session],
    delivery_id: int,
    *,
    payload_path: str,
    sop_instance_uid: str,
) -> bool:
    """Point a PENDING entry at another object (e.g. a Comprehensive SR fallback), due now.

    Returns
    -------
    bool
        False when the entry is no longer PENDING (nothing changed).
    """
    with sessions.begin() as session:
        d = session.scalars(
            select(Delivery).where(Delivery.id == delivery_id).with_for_update()
        ).one()
        if d.state != DeliveryState.PENDING.value:
            return False
        d.payload_path = payload_path
        d.sop_instance_uid = sop_instance_uid
        d.next_attempt_at = utcnow()
        return True


@dataclass(frozen=True)
class OutboxEntry:
    """One outbox entry as ``radflag outbox list`` shows it."""

    delivery_id: int
    study_instance_uid: str
    destination: str
    kind: str
    sop_instance_uid: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


def list_deliveries(
    sessions: sessionmaker[Session],
    *,
    states: Sequence[DeliveryState] | None = None,
    study_instance_uid: str | None = None,
    limit: int = 100,
) -> list[OutboxEntry]:
    """Return outbox entries, newest first, optionally filtered by state and study."""
    query = select(Delivery, Study.study_instance_uid).join(Study, Study.id == Delivery.study_id)
    if states:
        query = query.where(Delivery.state.in_([s.value for s in states]))
    if study_instance_uid:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    with sessions() as session:
        rows = session.execute(query.order_by(Delivery.id.desc()).limit(limit)).all()
        return [
            OutboxEntry(
                delivery_id=d.id,
                study_instance_uid=uid,
                destination=d.destination,
                kind=d.kind,
                sop_instance_uid=d.sop_instance_uid,
                state=d.state,
                attempts=d.attempts,
                next_attempt_at=d.next_attempt_at,
                last_error=d.last_error,
                created_at=d.created_at,
                sent_at=d.sent_at,
            )
            for d, uid in rows
        ]


class OutboxChangeRefused(ValueError):
    """An operator asked for a change the entry's state does not allow (message says why)."""


def retry_deliveries(
    sessions: sessionmaker[Session], delivery_ids: Sequence[int], *, actor: str = "cli"
) -> list[int]:
    """Make DEAD (or waiting PENDING) entries due now with a fresh attempt budget.

    A DELIVERY_FAILED study goes back to DELIVERING (event DELIVERY_RETRIED). The attempt
    history stays in ``delivery_attempts``. All entries change, or none.

    Raises
    ------
    OutboxChangeRefused
        If an id is unknown or the entry is SENT or CANCELLED (a superseded result must not
        be re-sent over its replacement).
    """
    now = utcnow()
    with sessions.begin() as session:
        entries = _lock_entries(session, delivery_ids)
        for d in entries:
            if d.state not in (DeliveryState.DEAD.value, DeliveryState.PENDING.value):
                raise OutboxChangeRefused(f"entry {d.id} is {d.state}; only DEAD/PENDING retry")
        for d in entries:
            study = session.scalars(
                select(Study).where(Study.id == d.study_id).with_for_update()
            ).one()
            previous = d.state
            d.state = DeliveryState.PENDING.value
            d.attempts = 0
            d.next_attempt_at = now
            audit(
                session,
                AuditEventType.DELIVERY_RETRIED,
                actor=actor,
                study=study,
                sop_instance_uid=d.sop_instance_uid,
                at=now,
                detail={"delivery_id": d.id, "destination": d.destination, "was": previous},
            )
            if study.state == StudyState.DELIVERY_FAILED.value:
                transition(
                    session,
                    study,
                    StudyEvent.DELIVERY_RETRIED,
                    audit_type=AuditEventType.DELIVERY_RETRIED,
                    actor=actor,
                    now=now,
                    detail={"delivery_id": d.id},
                )
                study.failure_reason = None
        return [d.id for d in entries]


def drop_deliveries(
    sessions: sessionmaker[Session], delivery_ids: Sequence[int], *, actor: str = "cli"
) -> list[int]:
    """Cancel PENDING or DEAD entries for good (audited as DELIVERY_DROPPED).

    A DELIVERING study whose last open entry is dropped becomes DONE; a DELIVERY_FAILED study
    stays DELIVERY_FAILED (the failure happened; the drop is in the audit trail). All entries
    change, or none.

    Raises
    ------
    OutboxChangeRefused
        If an id is unknown or the entry is already SENT or CANCELLED.
    """
    now = utcnow()
    with sessions.begin() as session:
        entries = _lock_entries(session, delivery_ids)
        for d in entries:
            if d.state not in (DeliveryState.DEAD.value, DeliveryState.PENDING.value):
                raise OutboxChangeRefused(f"entry {d.id} is {d.state}; only DEAD/PENDING drop")
        for d in entries:
            study = session.scalars(
                select(Study).where(Study.id == d.study_id).with_for_update()
            ).one()
            previous = d.state
            d.state = DeliveryState.CANCELLED.value
            d.next_attempt_at = None
            d.last_error = f"dropped by {actor}" + (f" ({d.last_error})" if d.last_error else "")
            audit(
                session,
                AuditEventType.DELIVERY_DROPPED,
                actor=actor,
                study=study,
                sop_instance_uid=d.sop_instance_uid,
                at=now,
                detail={"delivery_id": d.id, "destination": d.destination, "was": previous},
            )
            session.flush()
            _maybe_finish_study(session, study, now, actor)
        return [d.id for d in entries]


def _lock_entries(session: Session, delivery_ids: Sequence[int]) -> list[Delivery]:
    wanted = sorted(set(delivery_ids))
    if not wanted:
        raise OutboxChangeRefused("no outbox entry ids given")
    entries = list(
        session.scalars(
            select(Delivery).where(Delivery.id.in_(wanted)).order_by(Delivery.id).with_for_update()
        ).all()
    )
    missing = sorted(set(wanted) - {d.id for d in entries})
    if missing:
        raise OutboxChangeRefused(f"no outbox entry with id {', '.join(map(str, missing))}")
    return entries
