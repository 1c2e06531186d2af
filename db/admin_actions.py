"""Operator actions on studies: reprocess, resend, find; study identifiers from ingest.

* :func:`request_reprocess` puts finished studies back in the work queue (event
  ``REPROCESS_REQUESTED``): the worker classifies them again and the new result objects,
  which carry the same deterministic UIDs, replace the old ones at the PACS.
* :func:`resend_results` queues a study's existing result objects again to the configured
  destinations (event ``RESEND_REQUESTED``), one outbox entry per destination and kind.
* :func:`find_studies` looks studies up by Accession Number or by the keyed hash of the
  Patient ID (the same hash ingest stores).

Every change is one transaction with its audit row (actor ``cli`` or ``dup:<AE>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType
from db.models import Delivery, Instance, Result, Study, utcnow
from db.outbox import DeliveryState
from db.queue import transition
from db.results import OutputRecord, queue_delivery
from db.states import TERMINAL_STATES, StudyEvent, StudyState


class ActionRefused(ValueError):
    """The study's state or data does not allow the action (the message says why)."""


@dataclass(frozen=True)
class Target:
    """A destination to resend to: its name, address and the kinds it receives.

    ``ae_title``/``host`` may be empty for a ``to_sender`` destination: the study's sender is
    used then.
    """

    name: str
    ae_title: str
    host: str
    port: int
    kinds: tuple[str, ...]


# -- identifiers ------------------------------------------------------------------------------
def note_study_identifiers(
    sessions: sessionmaker[Session],
    study_instance_uid: str,
    accession_number: str | None,
    study_date: str | None,
) -> None:
    """Store Accession Number (0008,0050) and Study Date (0008,0020) where still unknown."""
    if not accession_number and not study_date:
        return
    with sessions.begin() as session:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).first()
        if study is None:
            return
        if accession_number and not study.accession_number:
            study.accession_number = accession_number[:16]
        if study_date and not study.study_date:
            study.study_date = study_date[:8]


def find_studies(
    sessions: sessionmaker[Session],
    *,
    accession_number: str | None = None,
    patient_keys: Sequence[str] = (),
    limit: int = 200,
) -> list[str]:
    """Return Study Instance UIDs matching an accession number or any of ``patient_keys``.

    ``patient_keys`` are the stored values of the Patient ID (its keyed hash, or the clear ID
    when the configuration stores it in clear): the caller hashes the admin's input the way
    ingest does (:class:`db.ingest.PatientIdPolicy`). Newest first.
    """
    conds = []
    if accession_number:
        conds.append(Study.accession_number == accession_number.strip())
    keys = [k for k in patient_keys if k]
    if keys:
        conds.append(Study.patient_key.in_(keys))
    if not conds:
        return []
    with sessions() as session:
        return list(
            session.scalars(
                select(Study.study_instance_uid)
                .where(or_(*conds))
                .order_by(Study.last_received_at.desc())
                .limit(limit)
            ).all()
        )


# -- reprocess --------------------------------------------------------------------------------
REPROCESSABLE: frozenset[StudyState] = TERMINAL_STATES | {StudyState.DELIVERING}


def _reprocess_one(session: Session, study: Study, actor: str, now: datetime) -> None:
    state = StudyState(study.state)
    if state not in REPROCESSABLE:
        raise ActionRefused(
            f"study {study.study_instance_uid} is {state.value}: it is already queued or in work"
        )
    usable = session.scalars(
        select(Instance.id).where(
            Instance.study_id == study.id,
            Instance.quarantined.is_(False),
            Instance.purged_at.is_(None),
        )
    ).first()
    if usable is None:
        raise ActionRefused(
            f"study {study.study_instance_uid} has no received image left to classify "
            "(purged by retention or quarantined); push it again instead"
        )
    transition(
        session,
        study,
        StudyEvent.REPROCESS_REQUESTED,
        audit_type=AuditEventType.STUDY_REPROCESS_REQUESTED,
        actor=actor,
        now=now,
    )
    study.ready_at = now
    study.finished_at = None
    study.failure_reason = None
    study.processing_attempts = 0
    study.lease_owner = None
    study.lease_expires_at = None


def request_reprocess(
    sessions: sessionmaker[Session], study_uids: Sequence[str], *, actor: str = "cli"
) -> list[str]:
    """Queue studies for classification again; all of them, or none.

    Raises
    ------
    ActionRefused
        When a UID is unknown, a study is not finished (already queued or in work), or no
        image of it is left in the spool.
    """
    now = utcnow()
    with sessions.begin() as session:
        studies = _lock_studies(session, study_uids)
        for study in studies:
            _reprocess_one(session, study, actor, now)
        return [s.study_instance_uid for s in studies]


def finished_since(sessions: sessionmaker[Session], since: datetime) -> list[str]:
    """Return UIDs of studies in a reprocessable state last received at or after ``since``."""
    with sessions() as session:
        return list(
            session.scalars(
                select(Study.study_instance_uid)
                .where(
                    Study.last_received_at >= since,
                    Study.state.in_([s.value for s in REPROCESSABLE]),
                )
                .order_by(Study.last_received_at)
            ).all()
        )


def _lock_studies(session: Session, study_uids: Sequence[str]) -> list[Study]:
    wanted = list(dict.fromkeys(u.strip() for u in study_uids if u.strip()))
    if not wanted:
        raise ActionRefused("no Study Instance UID given")
    studies = list(
        session.scalars(
            select(Study)
            .where(Study.study_instance_uid.in_(wanted))
            .order_by(Study.id)
            .with_for_update()
        ).all()
    )
    missing = [u for u in wanted if u not in {s.study_instance_uid for s in studies}]
    if missing:
        raise ActionRefused(f"no study {missing[0]} in the database")
    return studies


# -- resend -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Payload:
    sop_instance_uid: str
    payload_path: str
    result_id: int
    destination: str | None


def _payloads(session: Session, study: Study, results_root: Path) -> dict[str, list[_Payload]]:
    """Existing result objects of the study's current results, per kind (SR, SC)."""
    current = session.scalars(
        select(Result).where(Result.study_id == study.id, Result.superseded.is_(False))
    ).all()
    ids = [r.id for r in current]
    found: dict[str, list[_Payload]] = {}
    if ids:
        for d in session.scalars(
            select(Delivery).where(Delivery.result_id.in_(ids)).order_by(Delivery.id.desc())
        ).all():
            found.setdefault(d.kind, []).append(
                _Payload(d.sop_instance_uid, d.payload_path, d.result_id or 0, d.destination)
            )
    for r in current:  # the canonical SR is written even when no destination wanted it
        if r.sr_sop_instance_uid and r.sr_series_instance_uid:
            path = (
                results_root
                / study.study_instance_uid
                / r.sr_series_instance_uid
                / f"{r.sr_sop_instance_uid}.dcm"
            )
            found.setdefault("SR", []).append(
                _Payload(
                    r.sr_sop_instance_uid, path.relative_to(results_root).as_posix(), r.id, None
                )
            )
    return found


def _choose(candidates: list[_Payload], target: str, results_root: Path) -> list[_Payload]:
    """One payload per result: the one sent to this destination before, else any that exists."""
    by_result: dict[int, _Payload] = {}
    for p in sorted(candidates, key=lambda c: c.destination != target):
        path = Path(p.payload_path)
        if not path.is_absolute():
            path = results_root / path
        if p.result_id not in by_result and path.is_file():
            by_result[p.result_id] = p
    return list(by_result.values())


def _sender(session: Session, study: Study) -> tuple[str, str]:
    row = session.execute(
        select(Instance.calling_ae, Instance.peer_host)
        .where(Instance.study_id == study.id)
        .order_by(Instance.received_at.desc(), Instance.id.desc())
        .limit(1)
    ).first()
    return ("", "") if row is None else (row[0] or "", row[1] or "")


def _queue_for_target(
    session: Session,
    study: Study,
    target: Target,
    found: dict[str, list[_Payload]],
    results_root: Path,
    actor: str,
    now: datetime,
) -> int:
    ae_title, host = target.ae_title, target.host
    if not ae_title or not host:
        sender_ae, sender_host = _sender(session, study)
        ae_title, host = ae_title or sender_ae, host or sender_host
    n = 0
    for kind in target.kinds:
        for p in _choose(found.get(kind, []), target.name, results_root):
            out = OutputRecord(
                destination=target.name,
                ae_title=ae_title,
                host=host,
                port=target.port,
                kind=kind,
                sop_instance_uid=p.sop_instance_uid,
                payload_path=p.payload_path,
            )
            queue_delivery(
                session,
                study,
                p.result_id or None,
                out,
                actor=actor,
                now=now,
                detail={"resend": True},
            )
            n += 1
    return n


def _resend_one(
    session: Session,
    study: Study,
    targets: Sequence[Target],
    results_root: Path,
    actor: str,
    now: datetime,
) -> int:
    state = StudyState(study.state)
    if state not in (StudyState.DONE, StudyState.DELIVERY_FAILED, StudyState.DELIVERING):
        raise ActionRefused(
            f"study {study.study_instance_uid} is {state.value}: only a classified study has "
            "results to resend (use `radflag studies reprocess`)"
        )
    names = [t.name for t in targets]
    session.execute(  # a waiting entry to the same destination is replaced by the new one
        update(Delivery)
        .where(
            Delivery.study_id == study.id,
            Delivery.destination.in_(names),
            Delivery.state.in_([DeliveryState.PENDING.value, DeliveryState.DEAD.value]),
        )
        .values(
            state=DeliveryState.CANCELLED.value,
            next_attempt_at=None,
            last_error=f"replaced by a resend ({actor})",
        )
    )
    found = _payloads(session, study, results_root)
    n = sum(_queue_for_target(session, study, t, found, results_root, actor, now) for t in targets)
    if n == 0:
        raise ActionRefused(
            f"study {study.study_instance_uid} has no stored result object of the kinds "
            f"{sorted({k for t in targets for k in t.kinds})} (use `radflag studies reprocess`)"
        )
    transition(
        session,
        study,
        StudyEvent.RESEND_REQUESTED,
        audit_type=AuditEventType.STUDY_RESEND_REQUESTED,
        actor=actor,
        now=now,
        detail={"destinations": names, "objects": n},
    )
    study.finished_at = None
    study.failure_reason = None
    return n


def resend_results(
    sessions: sessionmaker[Session],
    study_uids: Sequence[str],
    targets: Sequence[Target],
    results_root: Path,
    *,
    actor: str = "cli",
) -> int:
    """Queue the current result objects of studies again, to ``targets``; all or none.

    Waiting (PENDING/DEAD) entries of the same study to the same destinations are cancelled
    and replaced. The objects keep their SOP Instance UIDs (the PACS replaces its copy).

    Returns
    -------
    int
        Outbox entries queued.

    Raises
    ------
    ActionRefused
        When a UID is unknown, a study has no result yet, no destination is given, or no
        stored object of the kinds the destinations receive exists.
    """
    if not targets:
        raise ActionRefused("no destination configured to resend to (add a [[destinations]])")
    now = utcnow()
    with sessions.begin() as session:
        return sum(
            _resend_one(session, s, targets, results_root, actor, now)
            for s in _lock_studies(session, study_uids)
        )


def on_duplicate_push(
    sessions: sessionmaker[Session],
    study_instance_uid: str,
    mode: str,
    targets: Sequence[Target],
    results_root: Path,
    *,
    actor: str,
) -> str | None:
    """React to a finished study pushed again (``[completion] on_duplicate_study``).

    ``resend`` queues the stored result objects of a DONE/DELIVERY_FAILED study again (and
    reprocesses when none fits the destinations); ``reprocess`` classifies any finished study
    again. A study not finished is left alone.

    Returns
    -------
    str or None
        What was done (``"resend"``/``"reprocess"``), None when nothing.
    """
    with sessions() as session:
        state = session.scalar(
            select(Study.state).where(Study.study_instance_uid == study_instance_uid)
        )
    if state is None or StudyState(state) not in TERMINAL_STATES or mode == "ignore":
        return None
    if mode == "resend":
        if state not in (StudyState.DONE.value, StudyState.DELIVERY_FAILED.value):
            return None  # nothing was produced to resend (NOT_APPLICABLE, FAILED)
        try:
            resend_results(sessions, [study_instance_uid], targets, results_root, actor=actor)
            return "resend"
        except ActionRefused:
            pass  # no stored object for these destinations: classify again to make them
    try:
        request_reprocess(sessions, [study_instance_uid], actor=actor)
    except ActionRefused:
        return None
    return "reprocess"
