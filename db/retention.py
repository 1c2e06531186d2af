"""Retention of spooled pixel data: the database side of the purge.

Once a study is finished (:data:`PURGEABLE_STATES`) and its last instance was received longer
ago than the configured age, its received instances are no longer needed: the results were
delivered (or there was nothing to deliver). A study is purged as a whole, never instance by
instance. The purge removes the files; the instance rows, results, deliveries and audit
rows stay, ``instances.purged_at`` records when the file went, and one ``INSTANCES_PURGED``
audit row per study records which instances were purged.

The study's result objects (SR, SC, rejection notes: they carry the patient's name and
burned-in pixels) are removed with it; their rows stay.

The file removal runs inside the study's transaction, with the study row locked, so that a
late instance cannot re-open the study between the check and the removal. When the removal
succeeded but the commit did not, the next run finds the files gone and records them as
purged (``missing``). A file that could not be removed stays unpurged and is reported in the
audit row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.models import Instance, Study, utcnow
from db.states import StudyState

PURGEABLE_STATES: frozenset[StudyState] = frozenset(
    {StudyState.DONE, StudyState.NOT_APPLICABLE, StudyState.FAILED}
)
"""Studies whose pixel data may go. DELIVERY_FAILED keeps it: an operator may retry."""

RemoveResults = Callable[[str], int]
"""Removes the result objects (SR, SC, KOS, their variants) of one study, given its Study
Instance UID; returns how many files went; raises :class:`OSError` when it could not."""

RemoveFile = Callable[[str], bool]
"""Removes one spooled file; True when removed, False when it was already gone; raises
:class:`OSError` when it could not be removed."""


@dataclass(frozen=True)
class StudyPurge:
    """What one study's purge did."""

    study_instance_uid: str
    purged: tuple[str, ...]
    """SOP Instance UIDs whose file was removed (or already gone)."""
    missing: tuple[str, ...]
    """Subset of ``purged`` whose file was already gone."""
    failed: dict[str, str]
    """SOP Instance UID -> error, for files that could not be removed (left unpurged)."""
    bytes_freed: int
    results_removed: int = 0
    """Result object files removed with the study (they carry names and burned-in pixels)."""


def purged_instances(sessions: sessionmaker[Session], study_id: int) -> list[str]:
    """Return the SOP Instance UIDs of the study whose spooled file retention removed.

    A study re-opened by a late image after its purge has only part of its images left; it
    must not be classified again from that subset.
    """
    with sessions() as session:
        return list(
            session.scalars(
                select(Instance.sop_instance_uid)
                .where(Instance.study_id == study_id, Instance.purged_at.is_not(None))
                .order_by(Instance.id)
            ).all()
        )


def studies_due(
    sessions: sessionmaker[Session], *, received_before: datetime, limit: int = 100
) -> list[int]:
    """Return ids of finished studies last received before the cutoff with unpurged instances.

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    received_before
        Studies whose last instance arrived before this time are old enough to purge.
    limit
        Most studies returned (oldest finish first).
    """
    with sessions() as session:
        return list(
            session.scalars(
                select(Study.id)
                .where(
                    Study.state.in_([s.value for s in PURGEABLE_STATES]),
                    Study.last_received_at < received_before,
                    Study.id.in_(select(Instance.study_id).where(Instance.purged_at.is_(None))),
                )
                .order_by(Study.finished_at, Study.id)
                .limit(limit)
            ).all()
        )


def purge_study(
    sessions: sessionmaker[Session],
    study_id: int,
    *,
    received_before: datetime,
    remove_file: RemoveFile,
    remove_results: RemoveResults | None = None,
    actor: str = "retention",
    now: datetime | None = None,
) -> StudyPurge | None:
    """Purge the instances of one old, finished study and audit it, in one transaction.

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    study_id
        The study (from :func:`studies_due`).
    received_before
        The study is purged only when its last instance arrived before this time.
    remove_file
        Removes one file (see :data:`RemoveFile`).
    remove_results
        Removes the study's result objects (see :data:`RemoveResults`); None keeps them.
    actor
        Audit actor.
    now
        Purge time (UTC now by default).

    Returns
    -------
    StudyPurge or None
        None when there was nothing to do (the study moved on, e.g. a late instance
        re-opened it, or another run purged it first).
    """
    when = now or utcnow()
    with sessions.begin() as session:
        study = session.scalars(
            select(Study).where(Study.id == study_id).with_for_update()
        ).one_or_none()
        if (
            study is None
            or StudyState(study.state) not in PURGEABLE_STATES
            or study.last_received_at >= received_before
        ):
            return None
        instances = session.scalars(
            select(Instance)
            .where(Instance.study_id == study.id, Instance.purged_at.is_(None))
            .order_by(Instance.id)
            .with_for_update()
        ).all()
        if not instances:
            return None
        purged: list[str] = []
        missing: list[str] = []
        failed: dict[str, str] = {}
        bytes_freed = 0
        for inst in instances:
            try:
                removed = remove_file(inst.path)
            except OSError as exc:
                failed[inst.sop_instance_uid] = f"{type(exc).__name__}: {exc.strerror or exc}"
                continue
            inst.purged_at = when
            purged.append(inst.sop_instance_uid)
            if removed:
                bytes_freed += inst.size_bytes
            else:
                missing.append(inst.sop_instance_uid)
        results_removed, results_error = 0, None
        if remove_results is not None:
            try:
                results_removed = remove_results(study.study_instance_uid)
            except OSError as exc:
                results_error = f"{type(exc).__name__}: {exc.strerror or exc}"
        audit(
            session,
            AuditEventType.INSTANCES_PURGED,
            actor=actor,
            study=study,
            at=when,
            detail={
                "study_state": study.state,
                "received_before": received_before.isoformat(),
                "purged": len(purged),
                "bytes_freed": bytes_freed,
                "sop_instance_uids": purged,
                "missing": missing,
                "failed": failed,
                "results_removed": results_removed,
                "results_error": results_error,
            },
        )
        return StudyPurge(
            study_instance_uid=study.study_instance_uid,
            purged=tuple(purged),
            missing=tuple(missing),
            failed=failed,
            bytes_freed=bytes_freed,
            results_removed=results_removed,
        )
