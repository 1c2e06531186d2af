"""Fixtures and row builders for the database tests (each runs on SQLite and PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.engine import make_session_factory
from db.models import Delivery, DeliveryAttempt, Instance, Result, Study


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@dataclass(frozen=True)
class ResultSpec:
    model_name: str = "pneumonia"
    model_version: str = "1.0.0"
    probability: float = 0.9
    positive: bool = True
    finding_code: str = "233604007"
    finding_meaning: str = "Pneumonia"
    superseded: bool = False
    created_at: datetime | None = None


def add_study(
    sessions: sessionmaker[Session],
    uid: str,
    *,
    state: str,
    calling_ae: str = "MODALITY",
    received_at: datetime,
    quiet_s: float | None = None,
    classify_s: float | None = None,
    deliver_s: float | None = None,
    results: tuple[ResultSpec, ...] = (),
    instance_paths: tuple[str, ...] = (),
    failure_reason: str | None = None,
    spread_s: float = 0.0,
) -> int:
    """Insert a study with explicit timestamps, its instances, results and one delivery.

    ``quiet_s``/``classify_s``/``deliver_s`` are the durations of the stages after the last
    instance (``received_at + spread_s``); None leaves the stage (and those after it) undone.
    """
    last = received_at + timedelta(seconds=spread_s)
    ready = last + timedelta(seconds=quiet_s) if quiet_s is not None else None
    classified = (
        ready + timedelta(seconds=classify_s)
        if ready is not None and classify_s is not None
        else None
    )
    delivered = (
        classified + timedelta(seconds=deliver_s)
        if classified is not None and deliver_s is not None
        else None
    )
    with sessions.begin() as s:
        study = Study(
            study_instance_uid=uid,
            state=state,
            patient_key=None,
            calling_ae=calling_ae,
            first_received_at=received_at,
            last_received_at=last,
            ready_at=ready,
            classified_at=classified,
            finished_at=delivered or classified,
            processing_attempts=1 if ready else 0,
            failure_reason=failure_reason,
            updated_at=delivered or classified or ready or last,
        )
        s.add(study)
        s.flush()
        paths = instance_paths or (f"/nonexistent/{uid}.1.dcm",)
        for n, path in enumerate(paths, start=1):
            s.add(
                Instance(
                    study_id=study.id,
                    sop_instance_uid=f"{uid}.{n}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                    series_instance_uid=f"{uid}.0",
                    modality="DX",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=path,
                    size_bytes=100 * n,
                    calling_ae=calling_ae,
                    peer_host="127.0.0.1",
                    received_at=received_at if n == 1 else last,
                    duplicate_count=0,
                    quarantined=False,
                )
            )
            audit(
                s,
                AuditEventType.INSTANCE_RECEIVED,
                actor=f"scp:{calling_ae}@127.0.0.1",
                study=study,
                sop_instance_uid=f"{uid}.{n}",
                at=received_at if n == 1 else last,
            )
        for spec in results:
            row = Result(
                study_id=study.id,
                model_name=spec.model_name,
                model_version=spec.model_version,
                weights_sha256="ab" * 32,
                finding_code=spec.finding_code,
                finding_meaning=spec.finding_meaning,
                probability=spec.probability,
                positive=spec.positive,
                threshold=0.5,
                n_images=1,
                images={f"{uid}.1": spec.probability},
                timings_ms={"total": 10.0},
                device="cpu",
                sr_series_instance_uid=None,
                sr_sop_instance_uid=f"{uid}.99",
                superseded=spec.superseded,
                created_at=spec.created_at or classified or received_at,
            )
            s.add(row)
            s.flush()
            if classified is not None:
                audit(
                    s,
                    AuditEventType.STUDY_CLASSIFIED,
                    actor="worker:w1",
                    study=study,
                    at=classified,
                    detail={"model": spec.model_name, "version": spec.model_version},
                )
            if delivered is not None and not spec.superseded:
                d = Delivery(
                    study_id=study.id,
                    result_id=row.id,
                    destination="pacs",
                    ae_title="PACS",
                    host="127.0.0.1",
                    port=104,
                    kind="SR",
                    sop_instance_uid=f"{uid}.99",
                    payload_path="/nonexistent/sr.dcm",
                    state="SENT",
                    attempts=1,
                    created_at=classified or received_at,
                    sent_at=delivered,
                )
                s.add(d)
                s.flush()
                s.add(
                    DeliveryAttempt(
                        delivery_id=d.id,
                        started_at=delivered - timedelta(seconds=0.1),
                        finished_at=delivered,
                        ok=True,
                        error=None,
                    )
                )
                audit(
                    s,
                    AuditEventType.DELIVERY_SENT,
                    actor="outbox",
                    study=study,
                    at=delivered,
                    detail={"destination": "pacs"},
                )
        return study.id


def detail_of(rows: list[Any], event_type: str) -> dict[str, Any]:
    """The detail of the only row of ``event_type``."""
    (row,) = [r for r in rows if r.event_type == event_type]
    return dict(row.detail)
