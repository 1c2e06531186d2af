"""The warm worker: claims READY studies and processes up to ``studies_in_flight`` at once.

A claim thread takes a study only when a slot is free (claims are bounded, so a burst of
studies waits in the queue, not in memory) and hands it to one of ``studies_in_flight``
study threads; they share the processor's prepare pool and micro-batchers.

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
from concurrent.futures import Future, ThreadPoolExecutor, wait
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
                    if self._stop.is_set():
                        return  # the study was just recorded: its lease ended with it
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
    studies_in_flight
        Studies processed at the same time (the processor must be thread-safe beyond 1).
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
        studies_in_flight: int = 1,
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
        self._slots = threading.BoundedSemaphore(studies_in_flight)
        self._pool = ThreadPoolExecutor(studies_in_flight, thread_name_prefix="radflag-study")
        self._in_flight: set[Future[None]] = set()
        self._lock = threading.Lock()
        self.processed = 0

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def wake(self) -> None:
        """Tell the worker there may be work (e.g. a study just became ready)."""
        self._wake.set()

    def stop(self, timeout_s: float) -> bool:
        """Stop claiming, let the studies in flight finish; return True if done in time."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        with self._lock:
            running = set(self._in_flight)
        _, late = wait(running, timeout=timeout_s)
        self._pool.shutdown(wait=False)
        return not self._thread.is_alive() and not late

    def run_once(self) -> bool:
        """Claim and process one study in this thread; return False when the queue was empty."""
        claim = self._claim()
        if claim is None:
            return False
        self._handle(claim)
        return True

    def _claim(self) -> ClaimedStudy | None:
        claim = claim_next(self._sessions, self.worker_id, self._lease_s)
        if claim is None:
            return None
        claim = resolve_paths(claim, self._root)
        log.info(
            "study claimed",
            extra={
                "study_instance_uid": claim.study_instance_uid,
                "instances": len(claim.instances),
                "attempt": claim.attempt,
            },
        )
        return claim

    def _handle(self, claim: ClaimedStudy) -> None:
        """Process one claimed study with its lease kept alive."""
        with LeaseKeeper(self._sessions, claim, lease_s=self._lease_s, interval_s=self._beat_s):
            self._processor.process(claim)
        with self._lock:
            self.processed += 1

    def _dispatch(self) -> bool:
        """Wait for a free slot, claim a study and start it; return False when none was ready."""
        while not self._slots.acquire(timeout=0.2):
            if self._stop.is_set():
                return False
        try:
            claim = self._claim()
        except BaseException:
            self._slots.release()
            raise
        if claim is None:
            self._slots.release()
            return False
        future = self._pool.submit(self._run_study, claim)
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(self._done)
        return True

    def _run_study(self, claim: ClaimedStudy) -> None:
        set_thread_role("worker")
        try:
            self._handle(claim)
        except Exception:
            log.exception("unexpected error while processing a study")
        finally:
            self._slots.release()

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._in_flight.discard(future)

    def _run(self) -> None:
        set_thread_role("worker")
        backoff_s = 0.0
        while not self._stop.is_set():
            try:
                busy = self._dispatch()
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
