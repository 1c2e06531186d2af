"""Read-only queries for the admin tools (``radflag studies``, ``radflag audit``).

Nothing here writes: every function opens its own session and returns plain frozen
dataclasses (or detached rows), so the CLI and the HTTP API can format them freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType
from db.models import AuditEvent, Delivery, Instance, Result, Study
from db.states import StudyState


@dataclass(frozen=True)
class StudyRow:
    """One line of ``radflag studies`` (and of the dashboard's study table).

    ``finding`` is the finding's name and ``positive`` the decision (PRESENT when True,
    ABSENT when False); ``deliveries_*`` count the outbox entries of the current results
    (cancelled ones excluded); ``reason`` says why a study ended NOT_APPLICABLE, FAILED or
    DELIVERY_FAILED.
    """

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
    accession_number: str | None = None
    study_date: str | None = None
    threshold: float | None = None
    deliveries_sent: int = 0
    deliveries_total: int = 0
    deliveries_dead: int = 0
    reason: str | None = None

    @property
    def decision(self) -> str | None:
        """``PRESENT``/``ABSENT`` for the finding, None without a result."""
        if self.positive is None:
            return None
        return "PRESENT" if self.positive else "ABSENT"

    @property
    def delivered(self) -> str:
        """What reached the destinations: ``2/2``, ``0/2 (1 dead)``, ``no destination``, ``-``."""
        if self.deliveries_total == 0:
            if self.state == StudyState.DONE.value and self.positive is not None:
                return "no destination"
            return "-"
        text = f"{self.deliveries_sent}/{self.deliveries_total}"
        return text + (f" ({self.deliveries_dead} dead)" if self.deliveries_dead else "")


def _delivery_counts(session: Session, study_id: int) -> tuple[int, int, int]:
    rows = session.execute(
        select(Delivery.state, func.count())
        .join(Result, Result.id == Delivery.result_id, isouter=True)
        .where(
            Delivery.study_id == study_id,
            Delivery.state != "CANCELLED",
            or_(Result.id.is_(None), Result.superseded.is_(False)),
        )
        .group_by(Delivery.state)
    ).all()
    counts = {state: int(n) for state, n in rows}
    return counts.get("SENT", 0), sum(counts.values()), counts.get("DEAD", 0)


def summarize_reasons(detail: dict[str, Any]) -> str:
    """Condense a ``STUDY_NOT_APPLICABLE`` audit detail into ``"view_not_frontal x2, ..."``.

    The detail maps each model name to its selection (``excluded``: SOP UID -> reason) and
    ``unreadable`` to the instances whose header could not be read.
    """
    counts: dict[str, int] = {}
    reasons = detail.get("reasons", detail)
    for key, value in (reasons or {}).items():
        if key == "unreadable" and isinstance(value, dict):
            if value:
                counts["unreadable header"] = counts.get("unreadable header", 0) + len(value)
        elif isinstance(value, dict) and isinstance(value.get("excluded"), dict):
            for why in value["excluded"].values():
                counts[str(why)] = counts.get(str(why), 0) + 1
    if not counts:
        return "no image any model applies to"
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(counts.items()))


def _reason(session: Session, st: Study) -> str | None:
    if st.state == StudyState.NOT_APPLICABLE.value:
        detail = session.scalars(
            select(AuditEvent.detail)
            .where(
                AuditEvent.study_id == st.id,
                AuditEvent.event_type == AuditEventType.STUDY_NOT_APPLICABLE.value,
            )
            .order_by(AuditEvent.id.desc())
            .limit(1)
        ).first()
        return summarize_reasons(detail or {})
    return st.failure_reason


def study_row(session: Session, st: Study) -> StudyRow:
    """Build the table row of one study (current result with the highest probability)."""
    result = session.scalars(
        select(Result)
        .where(Result.study_id == st.id, Result.superseded.is_(False))
        .order_by(Result.probability.desc())
        .limit(1)
    ).first()
    sent, total, dead = _delivery_counts(session, st.id)
    n_instances = session.scalar(
        select(func.count()).select_from(Instance).where(Instance.study_id == st.id)
    )
    return StudyRow(
        study_instance_uid=st.study_instance_uid,
        state=st.state,
        calling_ae=st.calling_ae,
        n_instances=int(n_instances or 0),
        finding=result.finding_meaning if result else None,
        probability=result.probability if result else None,
        positive=result.positive if result else None,
        model=f"{result.model_name} {result.model_version}" if result else None,
        first_received_at=st.first_received_at,
        last_received_at=st.last_received_at,
        classified_at=st.classified_at,
        finished_at=st.finished_at,
        failure_reason=st.failure_reason,
        accession_number=st.accession_number,
        study_date=st.study_date,
        threshold=result.threshold if result else None,
        deliveries_sent=sent,
        deliveries_total=total,
        deliveries_dead=dead,
        reason=_reason(session, st),
    )


def list_studies(
    sessions: sessionmaker[Session],
    *,
    limit: int = 50,
    study_uids: Sequence[str] | None = None,
) -> list[StudyRow]:
    """Return the most recently received studies (or those of ``study_uids``), newest first."""
    stmt = select(Study).order_by(Study.last_received_at.desc()).limit(limit)
    if study_uids is not None:
        stmt = stmt.where(Study.study_instance_uid.in_(list(study_uids)))
    with sessions() as session:
        return [study_row(session, st) for st in session.scalars(stmt).all()]


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


@dataclass(frozen=True)
class AuditQuery:
    """Filters of ``radflag audit``; every filter left at None matches everything.

    Filters about a study (``calling_ae``, ``study_instance_uid``, ``state`` and the result
    filters) keep only events that concern a study, except that ``calling_ae`` also matches
    events of the listener without a study (a rejected association, ``scp:<AE>@<host>``).
    The result filters (``finding``, ``positive``, ``model_name``, ``model_version``) keep the
    events of studies that have one result row (current or superseded) matching all of them.

    Attributes
    ----------
    since, until
        Half-open time range ``[since, until)`` on the event time (aware datetimes).
    event_types
        Event types to keep (any of them).
    calling_ae
        AE title of the sender (PS3.8 9.3.2: Calling AE Title).
    study_instance_uid
        One study.
    finding
        Code value or code meaning of the finding, case-insensitive (``233604007`` or
        ``pneumonia``).
    positive
        Decision of the result: True positive, False negative.
    model_name, model_version
        Model identity of the result.
    state
        Current state of the study.
    limit
        Most rows returned (the newest ones when ``newest_first``).
    newest_first
        Order newest first instead of oldest first.
    """

    since: datetime | None = None
    until: datetime | None = None
    event_types: tuple[AuditEventType, ...] = field(default_factory=tuple)
    calling_ae: str | None = None
    study_instance_uid: str | None = None
    finding: str | None = None
    positive: bool | None = None
    model_name: str | None = None
    model_version: str | None = None
    state: StudyState | None = None
    limit: int = 1000
    newest_first: bool = False

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be earlier than until")


@dataclass(frozen=True)
class AuditRow:
    """One audit event with the current state and sender of its study."""

    id: int
    at: datetime
    event_type: str
    actor: str
    study_instance_uid: str | None
    sop_instance_uid: str | None
    study_state: str | None
    calling_ae: str | None
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping (ISO 8601 times)."""
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "event_type": self.event_type,
            "actor": self.actor,
            "study_instance_uid": self.study_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "study_state": self.study_state,
            "calling_ae": self.calling_ae,
            "detail": self.detail,
        }


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _audit_conditions(q: AuditQuery) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if q.since is not None:
        conds.append(AuditEvent.at >= q.since)
    if q.until is not None:
        conds.append(AuditEvent.at < q.until)
    if q.event_types:
        conds.append(AuditEvent.event_type.in_([t.value for t in q.event_types]))
    if q.study_instance_uid is not None:
        conds.append(AuditEvent.study_instance_uid == q.study_instance_uid)
    if q.calling_ae is not None:
        actor_prefix = f"scp:{_escape_like(q.calling_ae)}@%"
        conds.append(
            or_(
                Study.calling_ae == q.calling_ae,
                and_(Study.id.is_(None), AuditEvent.actor.like(actor_prefix, escape="\\")),
            )
        )
    if q.state is not None:
        conds.append(Study.state == q.state.value)
    result_conds: list[ColumnElement[bool]] = []
    if q.finding is not None:
        needle = q.finding.strip().lower()
        result_conds.append(
            or_(
                Result.finding_code == q.finding.strip(),
                func.lower(Result.finding_meaning) == needle,
            )
        )
    if q.positive is not None:
        result_conds.append(Result.positive.is_(q.positive))
    if q.model_name is not None:
        result_conds.append(Result.model_name == q.model_name)
    if q.model_version is not None:
        result_conds.append(Result.model_version == q.model_version)
    if result_conds:
        conds.append(exists().where(Result.study_id == Study.id, *result_conds))
    return conds


def search_audit(sessions: sessionmaker[Session], query: AuditQuery) -> list[AuditRow]:
    """Return the audit events matching ``query`` (``radflag audit``).

    Events are joined to their study by ``study_id`` or, for events written before the study
    row existed (a duplicate of a known instance), by Study Instance UID.

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    query
        The filters.

    Returns
    -------
    list of AuditRow
        Oldest first (or newest first when ``query.newest_first``), at most ``query.limit``.
    """
    join_on = or_(
        Study.id == AuditEvent.study_id,
        and_(
            AuditEvent.study_id.is_(None),
            AuditEvent.study_instance_uid.is_not(None),
            Study.study_instance_uid == AuditEvent.study_instance_uid,
        ),
    )
    stmt = select(AuditEvent, Study.state, Study.calling_ae).outerjoin(Study, join_on)
    conds = _audit_conditions(query)
    if conds:
        stmt = stmt.where(*conds)
    order = (
        (AuditEvent.at.desc(), AuditEvent.id.desc())
        if query.newest_first
        else (AuditEvent.at, AuditEvent.id)
    )
    stmt = stmt.order_by(*order).limit(query.limit)
    with sessions() as session:
        return [
            AuditRow(
                id=ev.id,
                at=ev.at,
                event_type=ev.event_type,
                actor=ev.actor,
                study_instance_uid=ev.study_instance_uid,
                sop_instance_uid=ev.sop_instance_uid,
                study_state=state,
                calling_ae=calling_ae,
                detail=dict(ev.detail or {}),
            )
            for ev, state, calling_ae in session.execute(stmt).all()
        ]
