"""Read-only queries the admin HTTP API and dashboard need beyond ``db.queries``/``db.stats``.

* hourly throughput: instances received, studies classified, result objects delivered,
  studies failed, result objects given up (dead letters), per UTC hour of a window;
* studies that ended in failure (``FAILED``, ``DELIVERY_FAILED``), newest first;
* the gauges of ``/metrics``: studies per state and outbox entries per state.

Times are bucketed in Python so that SQLite and PostgreSQL give identical answers. Nothing here
returns patient identifiers (the study's ``patient_key`` is never selected).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType
from db.models import AuditEvent, Delivery, Instance, Study, utcnow
from db.outbox import DeliveryState
from db.states import StudyState

FAILED_STATES: tuple[StudyState, ...] = (StudyState.FAILED, StudyState.DELIVERY_FAILED)
"""Study states that need an operator's attention."""


@dataclass(frozen=True)
class HourlyThroughput:
    """What happened in one UTC hour ``[hour, hour + 1 h)``.

    ``failed_studies`` counts studies that went to ``FAILED`` or ``DELIVERY_FAILED``;
    ``dead_letters`` the result objects given up after their last delivery attempt.
    """

    hour: datetime
    received_instances: int
    classified_studies: int
    delivered_objects: int
    failed_studies: int
    dead_letters: int


def _floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def hourly_throughput(
    sessions: sessionmaker[Session], *, hours: int = 24, now: datetime | None = None
) -> list[HourlyThroughput]:
    """Return one bucket per UTC hour of the last ``hours`` hours (the current hour last).

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    hours
        Window length, 1 to 24 * 31 hours.
    now
        End of the window (aware); defaults to the current time.

    Raises
    ------
    ValueError
        When ``hours`` is out of range or ``now`` is naive.
    """
    if not 1 <= hours <= 24 * 31:
        raise ValueError(f"hours must be within [1, 744], got {hours}")
    end = now or utcnow()
    if end.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    first = _floor_hour(end) - timedelta(hours=hours - 1)
    keys = [first + timedelta(hours=i) for i in range(hours)]
    counts: dict[str, dict[datetime, int]] = {
        name: dict.fromkeys(keys, 0)
        for name in ("received", "classified", "delivered", "failed", "dead")
    }
    with sessions() as session:
        columns = {
            "received": select(Instance.received_at).where(Instance.received_at >= first),
            "classified": select(AuditEvent.at).where(
                AuditEvent.at >= first,
                AuditEvent.event_type == AuditEventType.STUDY_CLASSIFIED.value,
            ),
            "delivered": select(Delivery.sent_at).where(
                Delivery.sent_at.is_not(None), Delivery.sent_at >= first
            ),
            "failed": select(AuditEvent.at).where(
                AuditEvent.at >= first,
                AuditEvent.event_type == AuditEventType.STUDY_FAILED.value,
            ),
            "dead": select(AuditEvent.at).where(
                AuditEvent.at >= first,
                AuditEvent.event_type == AuditEventType.DELIVERY_DEAD.value,
            ),
        }
        for name, stmt in columns.items():
            for (t,) in session.execute(stmt).all():
                if t is None or t > end:
                    continue
                bucket = _floor_hour(t)
                if bucket in counts[name]:
                    counts[name][bucket] += 1
    return [
        HourlyThroughput(
            hour=k,
            received_instances=counts["received"][k],
            classified_studies=counts["classified"][k],
            delivered_objects=counts["delivered"][k],
            failed_studies=counts["failed"][k],
            dead_letters=counts["dead"][k],
        )
        for k in keys
    ]


@dataclass(frozen=True)
class FailedStudy:
    """A study that needs attention, with the reason radflag recorded."""

    study_instance_uid: str
    state: str
    calling_ae: str | None
    n_instances: int
    processing_attempts: int
    failure_reason: str | None
    last_received_at: datetime
    finished_at: datetime | None
    updated_at: datetime


def failed_studies(sessions: sessionmaker[Session], *, limit: int = 50) -> list[FailedStudy]:
    """Return studies in ``FAILED`` or ``DELIVERY_FAILED``, most recently changed first."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    n_instances = (
        select(func.count())
        .select_from(Instance)
        .where(Instance.study_id == Study.id)
        .scalar_subquery()
    )
    stmt = (
        select(Study, n_instances)
        .where(Study.state.in_([s.value for s in FAILED_STATES]))
        .order_by(Study.updated_at.desc(), Study.id.desc())
        .limit(limit)
    )
    with sessions() as session:
        return [
            FailedStudy(
                study_instance_uid=st.study_instance_uid,
                state=st.state,
                calling_ae=st.calling_ae,
                n_instances=int(n),
                processing_attempts=st.processing_attempts,
                failure_reason=st.failure_reason,
                last_received_at=st.last_received_at,
                finished_at=st.finished_at,
                updated_at=st.updated_at,
            )
            for st, n in session.execute(stmt).all()
        ]


@dataclass(frozen=True)
class QueueGauges:
    """Current counts for the ``/metrics`` gauges (every known state present, 0 if empty)."""

    studies_by_state: dict[str, int]
    deliveries_by_state: dict[str, int]

    @property
    def queue_depth(self) -> int:
        """Studies waiting for a worker (``READY``)."""
        return self.studies_by_state.get(StudyState.READY.value, 0)

    @property
    def outbox_backlog(self) -> int:
        """Result objects waiting to be sent (``PENDING``)."""
        return self.deliveries_by_state.get(DeliveryState.PENDING.value, 0)


def queue_gauges(sessions: sessionmaker[Session]) -> QueueGauges:
    """Count studies and outbox entries per state (two grouped queries)."""
    with sessions() as session:
        studies = {s.value: 0 for s in StudyState}
        for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
            studies[str(state)] = int(n)
        deliveries = {s.value: 0 for s in DeliveryState}
        for state, n in session.execute(
            select(Delivery.state, func.count()).group_by(Delivery.state)
        ):
            deliveries[str(state)] = int(n)
    return QueueGauges(studies_by_state=studies, deliveries_by_state=deliveries)
