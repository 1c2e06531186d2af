"""The warm worker thread: claims READY studies and processes them one at a time."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.queue import ClaimedStudy, claim_next

log = logging.getLogger(__name__)


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
    """

    def __init__(
        self,
        worker_id: str,
        sessions: sessionmaker[Session],
        processor: StudyHandler,
        *,
        lease_s: float,
        poll_interval_s: float,
    ) -> None:
        self.worker_id = worker_id
        self._sessions = sessions
        self._processor = processor
        self._lease_s = lease_s
        self._poll_s = poll_interval_s
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
        log.info(
            "study claimed",
            extra={
                "study_instance_uid": claim.study_instance_uid,
                "instances": len(claim.instances),
                "attempt": claim.attempt,
            },
        )
        self._processor.process(claim)
        self.processed += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except SQLAlchemyError as exc:
                log.error("database error in the worker loop: %s", type(exc).__name__)
                busy = False
            except Exception:
                log.exception("unexpected error in the worker loop")
                busy = False
            if not busy:
                self._wake.wait(self._poll_s)
                self._wake.clear()
