"""Read-only queries for the admin tools (``radflag studies``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Result, Study


@dataclass(frozen=True)
class StudyRow:
    """One line of ``radflag studies``."""

    study_instance_uid: str
    state: str
    calling_ae: str | None
    n_instances: int
    finding: str | None
    probability: float | None
    positive: bool | None
    model: str | None
    first_received_at: datetime
    last_received_at: datetime
    classified_at: datetime | None
    finished_at: datetime | None
    failure_reason: str | None


def list_studies(sessions: sessionmaker[Session], *, limit: int = 50) -> list[StudyRow]:
    """Return the most recently received studies with their current (non-superseded) result."""
    with sessions() as session:
        studies = session.scalars(
            select(Study).order_by(Study.last_received_at.desc()).limit(limit)
        ).all()
        rows: list[StudyRow] = []
        for st in studies:
            result = session.scalars(
                select(Result)
                .where(Result.study_id == st.id, Result.superseded.is_(False))
                .order_by(Result.probability.desc())
                .limit(1)
            ).first()
            rows.append(
                StudyRow(
                    study_instance_uid=st.study_instance_uid,
                    state=st.state,
                    calling_ae=st.calling_ae,
                    n_instances=len(st.instances),
                    finding=result.finding_meaning if result else None,
                    probability=result.probability if result else None,
                    positive=result.positive if result else None,
                    model=f"{result.model_name} {result.model_version}" if result else None,
                    first_received_at=st.first_received_at,
                    last_received_at=st.last_received_at,
                    classified_at=st.classified_at,
                    finished_at=st.finished_at,
                    failure_reason=st.failure_reason,
                )
            )
        return rows


def audit_trail(sessions: sessionmaker[Session], study_instance_uid: str) -> list[AuditEvent]:
    """Return every audit row about a study, oldest first."""
    with sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.study_instance_uid == study_instance_uid)
                .order_by(AuditEvent.at, AuditEvent.id)
            ).all()
        )
