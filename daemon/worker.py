"""The warm worker thread: claims READY studies and processes them one at a time.

While a study is processed a heartbeat thread (:class:`LeaseKeeper`) renews its lease every
``heartbeat_interval_s`` by the database clock, so a slow study is never taken over by another
process while it is still in progress, and a dead one's lease runs out within ``lease_s``.
When the database is unreachable the worker stops claiming and retries with exponential
backoff (up to :data:`MAX_BACKOFF_S`); half-done work is released by lease expiry.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.proc import set_thread_role
from db.queue import ClaimedStudy, claim_next, renew_lease

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
"""Longest wait between two claim attempts while the database is unreachable."""


class LeaseKeeper:
    """Renew the lease on one claim every ``interval_s`` from a thread, until :meth:`stop`.

    Use as a context manager around the work. A failed renewal (database error) is retried at
    the next beat; a lost lease (late instance, reclaimed) ends the heartbeat.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        claim: ClaimedStudy,
        *,
        lease_s: float,
        interval_s: float,
    ) -> None:
        self._sessions = sessions
        self._claim = claim
        self._lease_s = lease_s
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radflag-lease", daemon=True)
        self.renewals = 0
        self.lost = False

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                if not renew_lease(self._sessions, self._claim, self._lease_s):
                    self.lost = True
                    log.warning(
                        "lease lost while processing",
                        extra={"study_instance_uid": self._claim.study_instance_uid},
                    )
                    return
                self.renewals += 1
            except SQLAlchemyError as exc:
                log.error("lease renewal failed: %s", type(exc).__name__)


class StudyHandler(Protocol):
    """Anything that processes one claimed study to a recorded outcome (never raises)."""

    def process(self, claim: ClaimedStudy) -> None:
        """Process ``claim``."""


class Worker:
    """Claims studies from the database queue and runs a :class:`StudyHandler` on them.

    Parameters
    ----------
    worker_id
        Lease owner name (unique per process).
    sessions
        Session factory.
    processor
        Does the work on one study (:class:`daemon.pipeline.StudyProcessor`, possibly wrapped).
    lease_s
        Lease length; a study whose lease expires is given back to the queue.
    poll_interval_s
        How long to sleep when the queue is empty (``wake()`` cuts it short).
    heartbeat_interval_s
        Lease renewal period while a study is processed (default: a sixth of the lease).
    spool_root
        Root that instance paths are stored relative to; the processor gets full paths.
    """

    def __init__(
        self,
        worker_id: str,
        sessions: sessionmaker[Session],
        processor: StudyHandler,
        *,
        lease_s: float,
        poll_interval_s: float,
        heartbeat_interval_s: float | None = None,
        spool_root: Path | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._sessions = sessions
        self._processor = processor
        self._lease_s = lease_s
        self._poll_s = poll_interval_s
        self._beat_s = heartbeat_interval_s or lease_s / 6
        self._root = spool_root
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radflag-worker", daemon=True)
        self.processed = 0

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def wake(self) -> None:
        """Tell the worker there may be work (e.g. a study just became ready)."""
        self._wake.set()

    def stop(self, timeout_s: float) -> bool:
        """Ask the worker to stop after its current study; return True if it stopped in time."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def run_once(self) -> bool:
        """Claim and process one study; return False when the queue was empty."""
        claim = claim_next(self._sessions, self.worker_id, self._lease_s)
        if claim is None:
            return False
        claim = resolve_paths(claim, self._root)
        log.info(
            "study claimed",
            extra={
                "study_instance_uid": claim.study_instance_uid,
                "instances": len(claim.instances),
                "attempt": claim.attempt,
            },
        )
        with LeaseKeeper(self._sessions, claim, lease_s=self._lease_s, interval_s=self._beat_s):
            self._processor.process(claim)
        self.processed += 1
        return True

    def _run(self) -> None:
        set_thread_role("worker")
        backoff_s = 0.0
        while not self._stop.is_set():
            try:
                busy = self.run_once()
                backoff_s = 0.0
            except SQLAlchemyError as exc:
                backoff_s = min(MAX_BACKOFF_S, max(self._poll_s, backoff_s * 2))
                log.error(
                    "database error in the worker loop: %s; no claim for %.0f s",
                    type(exc).__name__,
                    backoff_s,
                )
                self._stop.wait(backoff_s)
                continue
            except Exception:
                log.exception("unexpected error in the worker loop")
                busy = False
            if not busy:
                self._wake.wait(self._poll_s)
                self._wake.clear()


def resolve_paths(claim: ClaimedStudy, root: Path | None) -> ClaimedStudy:
    """Return ``claim`` with instance paths (stored relative to ``root``) made full paths."""
    if root is None:
        return claim
    return dataclasses.replace(
        claim,
        instances=tuple(dataclasses.replace(i, path=str(root / i.path)) for i in claim.instances),
    )
