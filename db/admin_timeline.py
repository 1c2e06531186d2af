"""A study's full timeline for ``radflag studies show UID`` (read-only).

Everything radflag knows about one study, in the order it happened: the study row, the
instances received (from which sender, where the file is or when it was purged), the results
with their model identity, the deliveries with every attempt, and the audit events.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Delivery, DeliveryAttempt, Instance, Result, Study
from db.queries import AuditRow


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class StudySummary:
    """The study row (the patient key is omitted: it is not for display)."""

    study_instance_uid: str
    state: str
    calling_ae: str | None
    first_received_at: datetime
    last_received_at: datetime
    ready_at: datetime | None
    classified_at: datetime | None
    finished_at: datetime | None
    processing_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    failure_reason: str | None
    max_probability: float | None
    urgent: bool | None


@dataclass(frozen=True)
class InstanceEntry:
    """One received SOP instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str | None
    transfer_syntax_uid: str | None
    calling_ae: str
    peer_host: str | None
    received_at: datetime
    size_bytes: int
    duplicate_count: int
    quarantined: bool
    path: str
    purged_at: datetime | None


@dataclass(frozen=True)
class ResultEntry:
    """One model's conclusion, with the model's identity."""

    result_id: int
    created_at: datetime
    model_name: str
    model_version: str
    weights_sha256: str
    finding_code: str
    finding_meaning: str
    probability: float
    threshold: float
    positive: bool
    n_images: int
    device: str
    timings_ms: dict[str, Any]
    sr_sop_instance_uid: str | None
    superseded: bool


@dataclass(frozen=True)
class AttemptEntry:
    """One try at sending an outbox entry."""

    started_at: datetime
    finished_at: datetime
    ok: bool
    error: str | None


@dataclass(frozen=True)
class DeliveryEntry:
    """One outbox entry (result object to one destination) and its attempts."""

    delivery_id: int
    result_id: int | None
    destination: str
    ae_title: str
    host: str
    port: int
    kind: str
    sop_instance_uid: str
    state: str
    attempts: int
    created_at: datetime
    sent_at: datetime | None
    next_attempt_at: datetime | None
    last_error: str | None
    attempt_history: tuple[AttemptEntry, ...]


@dataclass(frozen=True)
class StudyTimeline:
    """Everything about one study, each list oldest first."""

    study: StudySummary
    instances: tuple[InstanceEntry, ...]
    results: tuple[ResultEntry, ...]
    deliveries: tuple[DeliveryEntry, ...]
    events: tuple[AuditRow, ...]

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping (ISO 8601 times)."""
        data: dict[str, Any] = _jsonable(asdict(self))
        data["events"] = [e.as_dict() for e in self.events]
        return data


def study_timeline(
    sessions: sessionmaker[Session], study_instance_uid: str
) -> StudyTimeline | None:
    """Return the timeline of one study, or None when radflag never saw it.

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    study_instance_uid
        Study Instance UID (0020,000D).
    """
    with sessions() as session:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).first()
        if study is None:
            return None
        instances = session.scalars(
            select(Instance)
            .where(Instance.study_id == study.id)
            .order_by(Instance.received_at, Instance.id)
        ).all()
        results = session.scalars(
            select(Result).where(Result.study_id == study.id).order_by(Result.created_at, Result.id)
        ).all()
        deliveries = session.scalars(
            select(Delivery)
            .where(Delivery.study_id == study.id)
            .order_by(Delivery.created_at, Delivery.id)
        ).all()
        attempts: dict[int, list[AttemptEntry]] = {d.id: [] for d in deliveries}
        if deliveries:
            for a in session.scalars(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id.in_(list(attempts)))
                .order_by(DeliveryAttempt.started_at, DeliveryAttempt.id)
            ).all():
                attempts[a.delivery_id].append(
                    AttemptEntry(
                        started_at=a.started_at, finished_at=a.finished_at, ok=a.ok, error=a.error
                    )
                )
        events = session.scalars(
            select(AuditEvent)
            .where(
                or_(
                    AuditEvent.study_id == study.id,
                    AuditEvent.study_instance_uid == study_instance_uid,
                )
            )
            .order_by(AuditEvent.at, AuditEvent.id)
        ).all()
        return StudyTimeline(
            study=StudySummary(
                study_instance_uid=study.study_instance_uid,
                state=study.state,
                calling_ae=study.calling_ae,
                first_received_at=study.first_received_at,
                last_received_at=study.last_received_at,
                ready_at=study.ready_at,
                classified_at=study.classified_at,
                finished_at=study.finished_at,
                processing_attempts=study.processing_attempts,
                lease_owner=study.lease_owner,
                lease_expires_at=study.lease_expires_at,
                failure_reason=study.failure_reason,
                max_probability=study.max_probability,
                urgent=study.urgent,
            ),
            instances=tuple(
                InstanceEntry(
                    sop_instance_uid=i.sop_instance_uid,
                    sop_class_uid=i.sop_class_uid,
                    series_instance_uid=i.series_instance_uid,
                    modality=i.modality,
                    transfer_syntax_uid=i.transfer_syntax_uid,
                    calling_ae=i.calling_ae,
                    peer_host=i.peer_host,
                    received_at=i.received_at,
                    size_bytes=i.size_bytes,
                    duplicate_count=i.duplicate_count,
                    quarantined=i.quarantined,
                    path=i.path,
                    purged_at=i.purged_at,
                )
                for i in instances
            ),
            results=tuple(
                ResultEntry(
                    result_id=r.id,
                    created_at=r.created_at,
                    model_name=r.model_name,
                    model_version=r.model_version,
                    weights_sha256=r.weights_sha256,
                    finding_code=r.finding_code,
                    finding_meaning=r.finding_meaning,
                    probability=r.probability,
                    threshold=r.threshold,
                    positive=r.positive,
                    n_images=r.n_images,
                    device=r.device,
                    timings_ms=dict(r.timings_ms or {}),
                    sr_sop_instance_uid=r.sr_sop_instance_uid,
                    superseded=r.superseded,
                )
                for r in results
            ),
            deliveries=tuple(
                DeliveryEntry(
                    delivery_id=d.id,
                    result_id=d.result_id,
                    destination=d.destination,
                    ae_title=d.ae_title,
                    host=d.host,
                    port=d.port,
                    kind=d.kind,
                    sop_instance_uid=d.sop_instance_uid,
                    state=d.state,
                    attempts=d.attempts,
                    created_at=d.created_at,
                    sent_at=d.sent_at,
                    next_attempt_at=d.next_attempt_at,
                    last_error=d.last_error,
                    attempt_history=tuple(attempts[d.id]),
                )
                for d in deliveries
            ),
            events=tuple(
                AuditRow(
                    id=e.id,
                    at=e.at,
                    event_type=e.event_type,
                    actor=e.actor,
                    study_instance_uid=e.study_instance_uid,
                    sop_instance_uid=e.sop_instance_uid,
                    study_state=study.state,
                    calling_ae=study.calling_ae,
                    detail=dict(e.detail or {}),
                )
                for e in events
            ),
        )
