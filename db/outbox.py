"""The delivery outbox: claims, attempts with exponential backoff and jitter, dead letters.

One entry per (result object, destination). A sender (``daemon.delivery``) *claims* due
entries first (:func:`claim_due`: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
write lock on SQLite) and moves them to SENDING with a lease that expires by the
**database's** clock; only then does it send, and it records each attempt against its claim
(:func:`record_attempt`). Two senders never hold the same entry, so in normal operation an
object is sent once per destination. A sender that dies leaves SENDING entries whose lease
lapses; they are due again and re-sent with the same SOP Instance UID (result UIDs derive
from content), which the PACS sees as the same object. A sender that stops gracefully gives
its unsent claims back (:func:`release_claims`).

Failures are retried after ``base * 2**(n-1)`` seconds (capped, with jitter) and given up
after ``max_attempts`` (DEAD, the study DELIVERY_FAILED). Operators list, retry and drop
entries (``radflag outbox``).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.clock import db_now
from db.models import Delivery, DeliveryAttempt, Study, utcnow
from db.queue import transition
from db.states import StudyEvent, StudyState


class DeliveryState(enum.StrEnum):
    """Where an outbox entry is."""

    PENDING = "PENDING"
    SENDING = "SENDING"
    """Claimed by a sender (``lease_owner``) until ``lease_expires_at`` (database clock)."""
    SENT = "SENT"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class BackoffPolicy:
    """Retry schedule: ``base_s * 2**(attempt-1)`` capped at ``max_s``, dead after ``max_attempts``.

    Attempts are counted per outbox entry. With ``jitter`` > 0 the actual delay is drawn
    uniformly from ``[delay * (1 - jitter), delay]`` so entries (and senders) that failed
    together do not retry in lockstep.
    """

    base_s: float = 10.0
    max_s: float = 600.0
    max_attempts: int = 10
    jitter: float = 0.0

    def delay_s(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (before jitter)."""
        return float(min(self.max_s, self.base_s * (2 ** max(0, attempts - 1))))

    def jittered_delay_s(self, attempts: int, rng: random.Random | None = None) -> float:
        """Return :meth:`delay_s` shortened by a random fraction of at most ``jitter``."""
        draw = (rng or random).random()
        return self.delay_s(attempts) * (1.0 - self.jitter * draw)


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


def _is_due(now: datetime) -> ColumnElement[bool]:
    """Return the SQL condition "due": PENDING and due, or SENDING with a lapsed lease."""
    return or_(
        and_(Delivery.state == DeliveryState.PENDING.value, Delivery.next_attempt_at <= now),
        and_(Delivery.state == DeliveryState.SENDING.value, Delivery.lease_expires_at < now),
    )


def due_destinations(sessions: sessionmaker[Session], *, limit: int = 64) -> list[str]:
    """Return the destinations that have due entries (see :func:`claim_due`)."""
    with sessions() as session:
        now = db_now(session)
        rows = session.scalars(
            select(Delivery.destination)
            .where(_is_due(now))
            .group_by(Delivery.destination)
            .order_by(func.min(Delivery.next_attempt_at))
            .limit(limit)
        ).all()
        return list(rows)


def claim_due(
    sessions: sessionmaker[Session],
    owner: str,
    *,
    lease_s: float,
    destinations: Collection[str] | None = None,
    limit: int = 200,
) -> list[DueDelivery]:
    """Claim due entries for ``owner``: SENDING with a lease of ``lease_s`` (database clock).

    Due means PENDING with its next attempt time come, or SENDING whose lease has lapsed
    (a sender that died; re-sent with the same UIDs). Rows locked by another sender's claim
    are skipped (``FOR UPDATE SKIP LOCKED``), so concurrent senders never claim the same
    entry. Oldest first; ``destinations`` restricts the claim.
    """
    with sessions.begin() as session:
        now = db_now(session)
        query = select(Delivery).where(_is_due(now))
        if destinations is not None:
            query = query.where(Delivery.destination.in_(list(destinations)))
        rows = session.scalars(
            query.order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        expires = now + timedelta(seconds=lease_s)
        for d in rows:
            d.state = DeliveryState.SENDING.value
            d.lease_owner = owner
            d.lease_expires_at = expires
        study_uids: dict[int, str] = {
            sid: uid
            for sid, uid in session.execute(
                select(Study.id, Study.study_instance_uid).where(
                    Study.id.in_(sorted({d.study_id for d in rows}))
                )
            )
        }
        return [_due(d, study_uids[d.study_id]) for d in rows]


def _due(d: Delivery, study_uid: str) -> DueDelivery:
    return DueDelivery(
        delivery_id=d.id,
        study_id=d.study_id,
        study_instance_uid=study_uid,
        destination=d.destination,
        ae_title=d.ae_title,
        host=d.host,
        port=d.port,
        kind=d.kind,
        sop_instance_uid=d.sop_instance_uid,
        payload_path=d.payload_path,
        attempts=d.attempts,
    )


def release_claims(
    sessions: sessionmaker[Session], delivery_ids: Sequence[int], owner: str, *, reason: str
) -> list[int]:
    """Give unsent claimed entries back (PENDING, due now) without counting an attempt.

    Only entries still SENDING under ``owner`` change; returns their ids.
    """
    if not delivery_ids:
        return []
    with sessions.begin() as session:
        return _release(session, owner, reason, Delivery.id.in_(list(delivery_ids)))


def release_claims_of(session: Session, owner: str, *, reason: str) -> list[int]:
    """Give back every entry a (dead) sender still holds, in the caller's transaction."""
    return _release(session, owner, reason)


def _release(session: Session, owner: str, reason: str, *where: Any) -> list[int]:
    now = db_now(session)
    rows = session.scalars(
        select(Delivery)
        .where(
            *where,
            Delivery.state == DeliveryState.SENDING.value,
            Delivery.lease_owner == owner,
        )
        .with_for_update()
    ).all()
    for d in rows:
        d.state = DeliveryState.PENDING.value
        d.lease_owner = None
        d.lease_expires_at = None
        d.next_attempt_at = now
        audit(
            session,
            AuditEventType.DELIVERY_RELEASED,
            actor="outbox",
            study_instance_uid=session.scalar(
                select(Study.study_instance_uid).where(Study.id == d.study_id)
            ),
            sop_instance_uid=d.sop_instance_uid,
            at=now,
            detail={
                "delivery_id": d.id,
                "destination": d.destination,
                "sender": owner,
                "reason": reason,
            },
        )
    return [d.id for d in rows]


def renew_claims(
    sessions: sessionmaker[Session], delivery_ids: Sequence[int], owner: str, *, lease_s: float
) -> int:
    """Extend ``owner``'s claims on entries still SENDING (database clock); return how many."""
    if not delivery_ids:
        return 0
    with sessions.begin() as session:
        now = db_now(session)
        rows = session.scalars(
            select(Delivery)
            .where(
                Delivery.id.in_(list(delivery_ids)),
                Delivery.state == DeliveryState.SENDING.value,
                Delivery.lease_owner == owner,
            )
            .with_for_update()
        ).all()
        for d in rows:
            d.lease_expires_at = now + timedelta(seconds=lease_s)
        return len(rows)


def due_deliveries(
    sessions: sessionmaker[Session], *, now: datetime | None = None, limit: int = 50
) -> list[DueDelivery]:
    """Return (without claiming) PENDING entries whose next attempt time has come, oldest first.

    For listings and tests; a sender uses :func:`claim_due`.
    """
    when = now or utcnow()
    with sessions() as session:
        rows = session.execute(
            select(Delivery, Study.study_instance_uid)
            .join(Study, Study.id == Delivery.study_id)
            .where(Delivery.state == DeliveryState.PENDING.value, Delivery.next_attempt_at <= when)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
        ).all()
        return [_due(d, uid) for d, uid in rows]


def record_attempt(
    sessions: sessionmaker[Session],
    delivery_id: int,
    *,
    started_at: datetime,
    ok: bool,
    error: str | None,
    retryable: bool,
    policy: BackoffPolicy,
    owner: str,
    actor: str = "outbox",
) -> DeliveryState:
    """Record one send attempt against ``owner``'s claim and move the entry (and study) on.

    A failure is retried after :meth:`BackoffPolicy.jittered_delay_s`; a permanent failure, or
    the last allowed attempt, makes the entry DEAD and the study DELIVERY_FAILED. When the
    claim is no longer ``owner``'s (lapsed and taken over, cancelled as superseded), only the
    attempt's history row is written and the entry is left to its current holder.

    Returns
    -------
    DeliveryState
        The entry's state after the attempt.
    """
    with sessions.begin() as session:
        now = db_now(session)
        d = session.scalars(
            select(Delivery).where(Delivery.id == delivery_id).with_for_update()
        ).one()
        study = session.scalars(select(Study).where(Study.id == d.study_id).with_for_update()).one()
        if d.state != DeliveryState.SENDING.value or d.lease_owner != owner:
            # Claim lost (superseded, or lapsed and re-claimed): keep the history only.
            session.add(
                DeliveryAttempt(
                    delivery_id=d.id, started_at=started_at, finished_at=now, ok=ok, error=error
                )
            )
            return DeliveryState(d.state)
        d.attempts += 1
        d.lease_owner = None
        d.lease_expires_at = None
        session.add(
            DeliveryAttempt(
                delivery_id=d.id, started_at=started_at, finished_at=now, ok=ok, error=error
            )
        )
        detail = {
            "sender": owner,
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
        d.state = DeliveryState.PENDING.value
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
        delay = round(policy.jittered_delay_s(d.attempts), 3)
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
            Delivery.state.in_(
                [DeliveryState.PENDING.value, DeliveryState.SENDING.value, DeliveryState.DEAD.value]
            ),
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
                .where(
                    Delivery.state.in_([DeliveryState.PENDING.value, DeliveryState.SENDING.value])
                )
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
        d.next_attempt_at = db_now(session)
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
