"""The append-only audit log: a closed vocabulary of events.

Every state change of a study commits together with its audit row (same session, same
transaction). Rows are only ever inserted, never updated or deleted.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from db.models import AuditEvent, Study, utcnow


class AuditEventType(enum.StrEnum):
    """Closed vocabulary of audit events."""

    DAEMON_STARTED = "DAEMON_STARTED"
    DAEMON_STOPPED = "DAEMON_STOPPED"
    ASSOCIATION_REJECTED = "ASSOCIATION_REJECTED"
    INSTANCE_RECEIVED = "INSTANCE_RECEIVED"
    INSTANCE_DUPLICATE = "INSTANCE_DUPLICATE"
    INSTANCE_REJECTED = "INSTANCE_REJECTED"
    INSTANCE_QUARANTINED = "INSTANCE_QUARANTINED"
    STUDY_READY = "STUDY_READY"
    STUDY_REOPENED = "STUDY_REOPENED"
    STUDY_CLAIMED = "STUDY_CLAIMED"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    PROCESSING_RETRY = "PROCESSING_RETRY"
    IMAGES_SELECTED = "IMAGES_SELECTED"
    STUDY_CLASSIFIED = "STUDY_CLASSIFIED"
    STUDY_NOT_APPLICABLE = "STUDY_NOT_APPLICABLE"
    STUDY_FAILED = "STUDY_FAILED"
    RESULT_SUPERSEDED = "RESULT_SUPERSEDED"
    DELIVERY_QUEUED = "DELIVERY_QUEUED"
    DELIVERY_ATTEMPT_FAILED = "DELIVERY_ATTEMPT_FAILED"
    DELIVERY_SENT = "DELIVERY_SENT"
    DELIVERY_SKIPPED = "DELIVERY_SKIPPED"
    """A re-computed result object is unchanged (same UID) and its destination has it."""
    DELIVERY_RELEASED = "DELIVERY_RELEASED"
    """A sender gave a claimed entry back unsent (shutdown); it is due again at once."""
    DELIVERY_DEAD = "DELIVERY_DEAD"
    DELIVERY_RETRIED = "DELIVERY_RETRIED"
    DELIVERY_DROPPED = "DELIVERY_DROPPED"
    """An operator removed an outbox entry (``radflag outbox drop``); it will not be sent."""
    STUDY_DONE = "STUDY_DONE"
    STUDY_REPROCESS_REQUESTED = "STUDY_REPROCESS_REQUESTED"
    STUDY_RESEND_REQUESTED = "STUDY_RESEND_REQUESTED"
    """An operator or a duplicate push queued a study's existing result objects again."""
    INSTANCES_PURGED = "INSTANCES_PURGED"
    """Retention removed spooled pixel data of a finished study (``instances.purged_at``)."""
    INSTANCE_DUPLICATE_KEPT_ASIDE = "INSTANCE_DUPLICATE_KEPT_ASIDE"
    """A known SOP instance arrived again with other content: the original stays, the new copy
    is kept aside (``detail.kept_aside``) for review."""
    PROCESS_STARTED = "PROCESS_STARTED"
    PROCESS_DEAD = "PROCESS_DEAD"
    """A process stopped heartbeating (or its pid is gone): its work went back to the queue."""
    LEASE_RECLAIMED = "LEASE_RECLAIMED"
    """A study leased by a dead process went back to the queue at once (not after expiry)."""


_process_id: str | None = None


def set_audit_process(process_id: str | None) -> None:
    """Name the process (``host:pid:nonce``) that every later audit row of this process is from.

    Set once by ``radflag serve`` at start-up (:class:`daemon.app.Radflag`); command-line tools
    leave it unset (NULL ``process_id``).
    """
    global _process_id
    _process_id = process_id


def audit(
    session: Session,
    event_type: AuditEventType,
    *,
    actor: str,
    study: Study | None = None,
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    """Add an audit row to ``session`` (the caller commits it with the change it describes).

    Parameters
    ----------
    session
        The open session whose transaction also carries the change being audited.
    event_type
        What happened, from the closed vocabulary.
    actor
        Who did it: ``"scp:<calling AE>@<host>"``, ``"worker:<id>"``, ``"scheduler"``, ``"cli"``.
    study
        The study concerned, if any.
    study_instance_uid, sop_instance_uid
        UIDs concerned (the study UID is taken from ``study`` when not given).
    detail
        JSON-serialisable details (no patient names or IDs).
    at
        Time of the event; now (UTC) by default.
    """
    row = AuditEvent(
        at=at or utcnow(),
        event_type=event_type.value,
        actor=actor,
        study_id=study.id if study is not None else None,
        study_instance_uid=study_instance_uid
        or (study.study_instance_uid if study is not None else None),
        sop_instance_uid=sop_instance_uid,
        detail=detail or {},
        process_id=_process_id,
    )
    if study is not None and study.id is None:
        row.study = study
    session.add(row)
    return row
