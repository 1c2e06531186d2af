"""The scheduled retention job: purge spooled pixel data and result objects of finished studies.

The database side (which studies, the lock, ``purged_at`` and the ``INSTANCES_PURGED`` audit
row) is :mod:`db.retention`; this module removes the files, only inside the spool (received
instances and ``quarantine/``), and the folders the purge leaves empty.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import RetentionSettings
from db.models import utcnow
from db.retention import purge_study, studies_due
from dicom_io.uids import is_valid_uid

log = logging.getLogger(__name__)


class OutsideSpool(OSError):
    """A path recorded for an instance is not inside the spool: it is not ours to delete."""


@dataclass
class RetentionSummary:
    """What one run of the retention job did."""

    studies: int = 0
    instances: int = 0
    missing: int = 0
    failed: int = 0
    bytes_freed: int = 0
    results_removed: int = 0
    errors: list[str] = field(default_factory=list)


class SpoolFileRemover:
    """Removes files inside one spool folder and prunes the folders left empty.

    Parameters
    ----------
    spool_root
        The spool folder (``storage.spool_dir``); nothing outside it is ever removed.
    """

    def __init__(self, spool_root: Path) -> None:
        self.root = spool_root.resolve()

    def __call__(self, path: str) -> bool:
        """Remove ``path``; True when removed, False when it was already gone.

        Raises
        ------
        OutsideSpool
            When ``path`` is not inside the spool.
        OSError
            When the file exists but cannot be removed.
        """
        target = (self.root / path).resolve()  # relative to the root (absolute: legacy)
        if not target.is_relative_to(self.root) or target == self.root:
            raise OutsideSpool(f"{path} is outside the spool {self.root}; not removed")
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        self._prune(target.parent)
        return True

    def _prune(self, folder: Path) -> None:
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone / busy): stop climbing
                return
            folder = folder.parent


class ResultsRemover:
    """Removes a study's folder of result objects inside the results spool.

    Parameters
    ----------
    results_root
        The results folder (``storage.results_dir``): ``<root>/<study UID>/...``.
    """

    def __init__(self, results_root: Path) -> None:
        self.root = results_root.resolve()

    def __call__(self, study_instance_uid: str) -> int:
        """Remove ``<root>/<study_instance_uid>``; return the number of files removed."""
        if not is_valid_uid(study_instance_uid):
            raise OutsideSpool(f"not a UID: {study_instance_uid!r}; nothing removed")
        folder = (self.root / study_instance_uid).resolve()
        if folder.parent != self.root or not folder.is_dir():
            return 0
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
        return count


def purge_spool(
    sessions: sessionmaker[Session],
    spool_root: Path,
    settings: RetentionSettings,
    *,
    results_root: Path | None = None,
    now: datetime | None = None,
) -> RetentionSummary:
    """Run the retention purge once (the scheduled job, also callable from tests).

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    spool_root
        The spool folder.
    results_root
        The results folder; a purged study's result objects go too. None keeps them.
    settings
        The ``[retention]`` settings.
    now
        The time the age is measured from (UTC now by default).
    """
    when = now or utcnow()
    cutoff = when - timedelta(days=settings.spool_max_age_days)
    remover = SpoolFileRemover(spool_root)
    remove_results = None if results_root is None else ResultsRemover(results_root)
    summary = RetentionSummary()
    for study_id in studies_due(
        sessions, received_before=cutoff, limit=settings.max_studies_per_run
    ):
        done = purge_study(
            sessions,
            study_id,
            received_before=cutoff,
            remove_file=remover,
            remove_results=remove_results,
            now=when,
        )
        if done is None:
            continue
        summary.studies += 1
        summary.instances += len(done.purged)
        summary.missing += len(done.missing)
        summary.failed += len(done.failed)
        summary.bytes_freed += done.bytes_freed
        summary.results_removed += done.results_removed
        summary.errors.extend(done.failed.values())
        if done.failed:
            log.warning(
                "retention could not remove some files",
                extra={"study_id": study_id, "failed": len(done.failed)},
            )
    if summary.studies:
        log.info(
            "retention purge",
            extra={
                "studies": summary.studies,
                "instances": summary.instances,
                "missing": summary.missing,
                "failed": summary.failed,
                "bytes_freed": summary.bytes_freed,
            },
        )
    return summary
