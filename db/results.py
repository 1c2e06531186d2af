"""Recording a study's classification results and queueing their delivery (one transaction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.models import Delivery, Instance, Result, Study, utcnow
from db.outbox import DeliveryState
from db.queue import ClaimedStudy, load_leased, release_lease, transition
from db.states import StudyEvent


@dataclass(frozen=True)
class ResultRecord:
    """One model's conclusion on a study, ready to be stored."""

    model_name: str
    model_version: str
    weights_sha256: str
    finding_code: str
    finding_meaning: str
    probability: float
    positive: bool
    threshold: float
    images: dict[str, float]
    timings_ms: dict[str, float]
    device: str
    sr_series_instance_uid: str | None = None
    sr_sop_instance_uid: str | None = None
    outputs: tuple[OutputRecord, ...] = field(default_factory=tuple)
    revision: int = 1
    content_key: str | None = None
    predecessor_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class OutputRecord:
    """A result object (SR, SC) written to the spool, to deliver to one destination."""

    destination: str
    ae_title: str
    host: str
    port: int
    kind: str
    sop_instance_uid: str
    payload_path: str


def queue_delivery(
    session: Session,
    study: Study,
    result_id: int | None,
    out: OutputRecord,
    *,
    actor: str,
    now: datetime,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one PENDING outbox entry, due now, and its DELIVERY_QUEUED audit row."""
    session.add(
        Delivery(
            study_id=study.id,
            result_id=result_id,
            destination=out.destination,
            ae_title=out.ae_title,
            host=out.host,
            port=out.port,
            kind=out.kind,
            sop_instance_uid=out.sop_instance_uid,
            payload_path=out.payload_path,
            state=DeliveryState.PENDING.value,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    audit(
        session,
        AuditEventType.DELIVERY_QUEUED,
        actor=actor,
        study=study,
        sop_instance_uid=out.sop_instance_uid,
        at=now,
        detail={"destination": out.destination, "kind": out.kind, **(detail or {})},
    )


def record_classification(
    sessions: sessionmaker[Session],
    claim: ClaimedStudy,
    records: list[ResultRecord],
    *,
    urgent_threshold: float | None = None,
    selection: dict[str, Any] | None = None,
) -> bool:
    """Store results, queue deliveries and move the study on, in one transaction.

    Earlier results of the study are marked superseded (every revision stays in ``results``)
    and their undelivered outbox entries cancelled. An output whose object (same SOP Instance
    UID: same content) already reached its destination is not queued again.

    Returns
    -------
    bool
        True when there is something to deliver (the study is DELIVERING), False when the study
        went straight to DONE (no destinations configured).

    Raises
    ------
    db.queue.LeaseLost
        When the worker no longer holds the study (its results are discarded by the caller).
    """
    now = utcnow()
    actor = f"worker:{claim.lease_owner}"
    with sessions.begin() as session:
        study = load_leased(session, claim)
        superseded = session.scalars(
            select(Result).where(Result.study_id == study.id, Result.superseded.is_(False))
        ).all()
        for old in superseded:
            old.superseded = True
            audit(
                session,
                AuditEventType.RESULT_SUPERSEDED,
                actor=actor,
                study=study,
                at=now,
                detail={"result_id": old.id, "model": old.model_name, "version": old.model_version},
            )
        session.execute(
            update(Delivery)
            .where(
                Delivery.study_id == study.id,
                Delivery.state.in_([DeliveryState.PENDING.value, DeliveryState.SENDING.value]),
            )
            .values(
                state=DeliveryState.CANCELLED.value,
                last_error="superseded by a newer result",
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        if selection is not None:
            audit(
                session,
                AuditEventType.IMAGES_SELECTED,
                actor=actor,
                study=study,
                at=now,
                detail=selection,
            )
        n_outputs = 0
        max_probability = 0.0
        for rec in records:
            row = Result(
                study_id=study.id,
                model_name=rec.model_name,
                model_version=rec.model_version,
                weights_sha256=rec.weights_sha256,
                finding_code=rec.finding_code,
                finding_meaning=rec.finding_meaning,
                probability=rec.probability,
                positive=rec.positive,
                threshold=rec.threshold,
                n_images=len(rec.images),
                images=dict(rec.images),
                timings_ms=dict(rec.timings_ms),
                device=rec.device,
                sr_series_instance_uid=rec.sr_series_instance_uid,
                sr_sop_instance_uid=rec.sr_sop_instance_uid,
                superseded=False,
                created_at=now,
                revision=rec.revision,
                content_key=rec.content_key,
                predecessor_sop_instance_uid=rec.predecessor_sop_instance_uid,
            )
            session.add(row)
            session.flush()
            max_probability = max(max_probability, rec.probability)
            for out in rec.outputs:
                if _already_sent(session, study.id, out):
                    audit(
                        session,
                        AuditEventType.DELIVERY_SKIPPED,
                        actor=actor,
                        study=study,
                        sop_instance_uid=out.sop_instance_uid,
                        at=now,
                        detail={"destination": out.destination, "kind": out.kind},
                    )
                    continue
                queue_delivery(session, study, row.id, out, actor=actor, now=now)
                n_outputs += 1
        study.max_probability = max_probability
        study.urgent = (
            any(r.positive for r in records)
            if urgent_threshold is None
            else (max_probability >= urgent_threshold)
        )
        study.classified_at = now
        study.failure_reason = None
        release_lease(study)
        transition(
            session,
            study,
            StudyEvent.CLASSIFIED,
            audit_type=AuditEventType.STUDY_CLASSIFIED,
            actor=actor,
            now=now,
            detail={
                "results": [
                    {
                        "model": r.model_name,
                        "version": r.model_version,
                        "weights_sha256": r.weights_sha256,
                        "finding": r.finding_code,
                        "probability": round(r.probability, 6),
                        "positive": r.positive,
                        "n_images": len(r.images),
                    }
                    for r in records
                ],
                "outputs": n_outputs,
            },
        )
        if n_outputs == 0:
            study.finished_at = now
            transition(
                session,
                study,
                StudyEvent.ALL_DELIVERED,
                audit_type=AuditEventType.STUDY_DONE,
                actor=actor,
                now=now,
                detail={"destinations": 0},
            )
            return False
        return True


def _already_sent(session: Session, study_id: int, out: OutputRecord) -> bool:
    """Return True when this object (same SOP Instance UID) already reached its destination.

    Content-derived UIDs make an unchanged result the same object: it is sent at most once
    per destination per revision.
    """
    return (
        session.scalar(
            select(Delivery.id)
            .where(
                Delivery.study_id == study_id,
                Delivery.destination == out.destination,
                Delivery.sop_instance_uid == out.sop_instance_uid,
                Delivery.state == DeliveryState.SENT.value,
            )
            .limit(1)
        )
        is not None
    )


@dataclass(frozen=True)
class SentObject:
    """A result object that reached a destination: what, where from, to which AE."""

    kind: str
    payload_path: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class PriorRevision:
    """The current (latest, not superseded) result of one model on a study."""

    result_id: int
    revision: int
    content_key: str | None
    sr_series_instance_uid: str | None
    sr_sop_instance_uid: str | None
    predecessor_sop_instance_uid: str | None
    predecessor_series_instance_uid: str | None
    sent: dict[str, list[SentObject]]
    """Per destination, the objects of this revision it received (SENT)."""


def prior_revision(
    sessions: sessionmaker[Session], study_id: int, model_name: str
) -> PriorRevision | None:
    """Return the study's current result of ``model_name`` (what a new result would revise)."""
    with sessions() as session:
        row = session.scalars(
            select(Result)
            .where(Result.study_id == study_id, Result.model_name == model_name)
            .order_by(Result.id.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        sent: dict[str, list[SentObject]] = {}
        for d in session.scalars(
            select(Delivery)
            .where(Delivery.result_id == row.id, Delivery.state == DeliveryState.SENT.value)
            .order_by(Delivery.id)
        ):
            sent.setdefault(d.destination, []).append(
                SentObject(d.kind, d.payload_path, d.ae_title, d.host, d.port)
            )
        predecessor_series = (
            None
            if row.predecessor_sop_instance_uid is None
            else session.scalar(
                select(Result.sr_series_instance_uid)
                .where(Result.sr_sop_instance_uid == row.predecessor_sop_instance_uid)
                .limit(1)
            )
        )
        return PriorRevision(
            result_id=row.id,
            revision=row.revision,
            content_key=row.content_key,
            sr_series_instance_uid=row.sr_series_instance_uid,
            sr_sop_instance_uid=row.sr_sop_instance_uid,
            predecessor_sop_instance_uid=row.predecessor_sop_instance_uid,
            predecessor_series_instance_uid=predecessor_series,
            sent=sent,
        )


def study_sender(sessions: sessionmaker[Session], study_id: int) -> tuple[str | None, str | None]:
    """Return ``(calling AE title, peer host)`` of the last instance received for a study.

    Used to send results back to the sender's AE. ``(None, None)`` when unknown.
    """
    with sessions() as session:
        row = session.execute(
            select(Instance.calling_ae, Instance.peer_host)
            .where(Instance.study_id == study_id)
            .order_by(Instance.received_at.desc(), Instance.id.desc())
            .limit(1)
        ).first()
        return (None, None) if row is None else (row[0], row[1])
