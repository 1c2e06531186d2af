"""Recording received instances: one transaction per instance, before the C-STORE is answered.

The study row is locked (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE``
serialises writers) before its state is read, and the state changes only through the
transition table (:mod:`db.states`): an instance that arrives while a worker claims the study
either waits for the claim to commit and then re-opens the study (``STUDY_REOPENED``; the
worker's run is superseded), or is committed first so the claim includes it. It is never left
out of a study that ends DONE. Paths are stored relative to the spool root.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.clock import db_now
from db.models import AuditEvent, Instance, Study
from db.queue import transition
from db.states import StudyEvent, StudyState, next_state


@dataclass(frozen=True)
class NewInstance:
    """What the listener knows about an instance it has written to the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    patient_id: str | None
    calling_ae: str
    peer_host: str | None
    path: str
    size_bytes: int
    transfer_syntax_uid: str | None
    reopens_study: bool = True
    """False for objects no model reads (SR, SC, presentation states: the loop guard): they
    are stored and audited, but a finished study is not re-opened for them."""
    differs_from_spooled: bool = False
    """The spool already held a file for this SOP instance with other bytes; ``path`` is where
    this copy was kept aside. A duplicate of a known instance is then audited as
    ``INSTANCE_DUPLICATE_KEPT_ASIDE`` (the original stays); a new instance uses ``path``."""


@dataclass(frozen=True)
class PatientIdPolicy:
    """How patient identifiers are stored: keyed hash (default) or clear text."""

    key: bytes
    store_clear: bool = False

    def key_for(self, patient_id: str | None) -> str | None:
        """Return the value stored for ``patient_id`` (HMAC-SHA256 hex unless clear text)."""
        if not patient_id:
            return None
        if self.store_clear:
            return patient_id
        return hmac.new(self.key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


def record_instance(
    sessions: sessionmaker[Session],
    item: NewInstance,
    policy: PatientIdPolicy,
    *,
    now: datetime | None = None,
) -> bool:
    """Commit the row for a received instance, creating or re-opening its study.

    The study's state change (``INSTANCE_RECEIVED``) and the audit row commit in the same
    transaction as the instance row. A SOP instance already known is not stored twice: its
    duplicate counter goes up and an ``INSTANCE_DUPLICATE`` audit row is written.

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    item
        The instance, already durable in the spool.
    policy
        How to store the patient identifier.
    now
        The receive time (the database's clock by default).

    Returns
    -------
    bool
        True for a new instance, False for a duplicate.
    """
    for attempt in range(3):
        try:
            with sessions.begin() as session:
                return _record(session, item, policy, now or db_now(session))
        except IntegrityError:
            # Two associations raced on the same new study or instance: retry once the winner
            # has committed; the second pass sees its rows.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _record(session: Session, item: NewInstance, policy: PatientIdPolicy, when: datetime) -> bool:
    actor = f"scp:{item.calling_ae}@{item.peer_host or '?'}"
    if _append_to_receiving_study(session, item, actor, when):
        return True
    existing = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == item.sop_instance_uid)
    ).first()
    if existing is not None:
        _record_duplicate(session, existing, item, actor, when)
        return False

    study = session.scalars(
        select(Study).where(Study.study_instance_uid == item.study_instance_uid).with_for_update()
    ).first()
    if study is None:
        study = Study(
            study_instance_uid=item.study_instance_uid,
            state=StudyState.RECEIVING.value,
            patient_key=policy.key_for(item.patient_id),
            calling_ae=item.calling_ae,
            first_received_at=when,
            last_received_at=when,
            processing_attempts=0,
            updated_at=when,
        )
        session.add(study)
        session.flush()
    elif item.reopens_study or study.state == StudyState.RECEIVING.value:
        # (An object no model reads — e.g. our own SR/SC routed back by the PACS — is stored
        # but leaves a study that is already past RECEIVING where it is: the loop guard.)
        _receive_into(session, study, actor, when)
    session.add(Instance(**_instance_values(item, study.id, when)))
    audit(
        session,
        AuditEventType.INSTANCE_RECEIVED,
        actor=actor,
        study=study,
        sop_instance_uid=item.sop_instance_uid,
        at=when,
        detail=_received_detail(item),
    )
    return True


_KNOWN_INSTANCE = select(Instance.id).where(Instance.sop_instance_uid == bindparam("sop_uid"))
_LOCK_STUDY = (
    select(Study.id, Study.state)
    .where(Study.study_instance_uid == bindparam("study_uid"))
    .with_for_update()
)
_TOUCH_STUDY = (
    update(Study)
    .where(Study.id == bindparam("study_id"))
    .values(
        last_received_at=bindparam("when"), state=bindparam("state"), updated_at=bindparam("when")
    )
)
_INSERT_INSTANCE = insert(Instance)
_INSERT_AUDIT = insert(AuditEvent)
_AUDIT_COLUMNS = [c.key for c in AuditEvent.__table__.columns if not c.primary_key]


def _append_to_receiving_study(
    session: Session, item: NewInstance, actor: str, when: datetime
) -> bool:
    """Record a new instance of a study still RECEIVING with five prepared statements.

    The common case of a burst (every instance of a study but its first): the same rows,
    the same study lock and the same audit row (built by :func:`db.audit.audit`) as the
    general path, without the ORM's unit of work. Returns False, having changed nothing,
    when the general path must run (known instance, new study, or a study past RECEIVING).
    """
    conn = session.connection()
    if conn.execute(_KNOWN_INSTANCE, {"sop_uid": item.sop_instance_uid}).first() is not None:
        return False
    study = conn.execute(_LOCK_STUDY, {"study_uid": item.study_instance_uid}).first()
    if study is None or study.state != StudyState.RECEIVING.value:
        return False
    state = next_state(StudyState.RECEIVING, StudyEvent.INSTANCE_RECEIVED).value
    conn.execute(_TOUCH_STUDY, {"study_id": study.id, "when": when, "state": state})
    conn.execute(_INSERT_INSTANCE, _instance_values(item, study.id, when))
    row = audit(
        session,
        AuditEventType.INSTANCE_RECEIVED,
        actor=actor,
        study_instance_uid=item.study_instance_uid,
        sop_instance_uid=item.sop_instance_uid,
        at=when,
        detail=_received_detail(item),
    )
    session.expunge(row)  # inserted here, not by the unit of work
    row.study_id = study.id
    conn.execute(_INSERT_AUDIT, {key: getattr(row, key) for key in _AUDIT_COLUMNS})
    return True


def _instance_values(item: NewInstance, study_id: int, when: datetime) -> dict[str, object]:
    return {
        "study_id": study_id,
        "sop_instance_uid": item.sop_instance_uid,
        "sop_class_uid": item.sop_class_uid,
        "series_instance_uid": item.series_instance_uid,
        "modality": item.modality,
        "transfer_syntax_uid": item.transfer_syntax_uid,
        "path": item.path,
        "size_bytes": item.size_bytes,
        "calling_ae": item.calling_ae,
        "peer_host": item.peer_host,
        "received_at": when,
        "duplicate_count": 0,
        "quarantined": False,
    }


def _received_detail(item: NewInstance) -> dict[str, object]:
    return {
        "sop_class_uid": item.sop_class_uid,
        "modality": item.modality,
        "size_bytes": item.size_bytes,
        "transfer_syntax_uid": item.transfer_syntax_uid,
    }


def _receive_into(session: Session, study: Study, actor: str, when: datetime) -> None:
    """Apply ``INSTANCE_RECEIVED`` to the locked ``study`` (re-opening it when past RECEIVING)."""
    study.last_received_at = when
    if study.state == StudyState.RECEIVING.value:
        study.state = next_state(StudyState.RECEIVING, StudyEvent.INSTANCE_RECEIVED).value
        study.updated_at = when
        return
    holder = study.lease_owner
    study.lease_owner = None
    study.lease_expires_at = None
    study.ready_at = None
    transition(
        session,
        study,
        StudyEvent.INSTANCE_RECEIVED,
        audit_type=AuditEventType.STUDY_REOPENED,
        actor=actor,
        now=when,
        detail={"lease_owner": holder} if holder else None,
    )


def _record_duplicate(
    session: Session, existing: Instance, item: NewInstance, actor: str, when: datetime
) -> None:
    """Count a known SOP instance received again; the stored original is never replaced."""
    existing.duplicate_count += 1
    detail: dict[str, object] = {"duplicate_count": existing.duplicate_count}
    event = AuditEventType.INSTANCE_DUPLICATE
    if item.differs_from_spooled:
        event = AuditEventType.INSTANCE_DUPLICATE_KEPT_ASIDE
        detail.update(kept_aside=item.path, size_bytes=item.size_bytes, original=existing.path)
    audit(
        session,
        event,
        actor=actor,
        study_instance_uid=item.study_instance_uid,
        sop_instance_uid=item.sop_instance_uid,
        at=when,
        detail=detail,
    )
