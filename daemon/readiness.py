"""Studies ready on time: an in-process deadline per receiving study.

dcm4chee's export rules wait a delay after a study's last instance; radflag's quiet period
(``completion.quiet_period_s``) is that delay. The periodic completion job alone finds a
quiet study up to one ``completion.check_interval_s`` late. The process that received the
instance knows when the quiet period ends, so the listener's sink is wrapped
(:class:`ArmingSink`) to arm a deadline for the study each time one of its instances is
committed: due = now + quiet period, re-armed by every new instance. One thread
(:class:`ReadinessTimer`) waits for the earliest deadline and runs the completion step
(in the daemon: :func:`db.queue.mark_ready` under the cluster-wide ``complete_studies``
lock, the same step as the periodic job), which returns the quiet period each due study
still has to wait by the **database's** clock (another listener may have received a later
instance, or the lock was busy). Those are re-armed, never sooner than ``min_retry_s``, so a
study the database does not consider quiet yet is waited for, not spun on.

The periodic job stays the cluster-wide fallback: studies received by other processes or
before a restart, and deadlines dropped when more than ``max_studies`` are armed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from daemon.proc import set_thread_role
from db.locks import cluster_singleton
from db.queue import mark_ready, quiet_left
from dicom_io.scp import InstanceSink, ReceivedInstance

log = logging.getLogger(__name__)

SettleStep = Callable[[Collection[str]], dict[str, float]]
"""Run the completion step for the given due studies; return, for those still waiting for
their quiet period, the seconds left (database clock). Studies left out need nothing more."""


@dataclass(frozen=True)
class DeadlinePolicy:
    """When deadlines fall due and how they are retried.

    Attributes
    ----------
    quiet_period_s
        ``completion.quiet_period_s``: a deadline is due this long after the last instance.
    min_retry_s
        Shortest wait before a due study is tried again (no busy loop on clock skew).
    error_retry_s
        Wait before trying again after the completion step failed (database unavailable).
    max_studies
        Most studies armed at once; beyond it the oldest armed is dropped (the periodic job
        still completes it).
    """

    quiet_period_s: float
    min_retry_s: float = 0.1
    error_retry_s: float = 1.0
    max_studies: int = 4096


class ReadinessTimer:
    """Fires :data:`SettleStep` at each receiving study's end of quiet period, from one thread.

    Parameters
    ----------
    policy
        Quiet period and retry bounds.
    settle
        The completion step (see :data:`SettleStep`); it must not raise for bad studies, a
        raised exception counts as "try again after ``error_retry_s``".
    clock
        Monotonic seconds (tests inject a fake one and call :meth:`run_due` themselves).
    """

    def __init__(
        self,
        policy: DeadlinePolicy,
        settle: SettleStep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._settle = settle
        self._clock = clock
        self._due: OrderedDict[str, float] = OrderedDict()
        self._cond = threading.Condition()
        self._stopping = False
        self._waiting_until: float | None = None
        """When the thread will look again (None: not before an arm())."""
        self._thread: threading.Thread | None = None

    def arm(self, study_uid: str) -> None:
        """(Re-)arm the study's deadline: one quiet period from now."""
        with self._cond:
            due = self._clock() + self._policy.quiet_period_s
            self._set(study_uid, due)
            if self._waiting_until is None or due < self._waiting_until:
                self._cond.notify()  # else the thread looks in time anyway (one wake per study)

    def _set(self, study_uid: str, due: float) -> None:
        """Set a deadline (caller holds the lock); drop the oldest armed beyond the bound."""
        self._due[study_uid] = due
        self._due.move_to_end(study_uid)
        while len(self._due) > self._policy.max_studies:
            self._due.popitem(last=False)
            log.debug("readiness deadline dropped; the periodic completion job takes it")

    def armed(self) -> dict[str, float]:
        """Return a copy of the armed deadlines (study UID -> due time on ``clock``)."""
        with self._cond:
            return dict(self._due)

    def run_due(self) -> float | None:
        """Settle the studies due now and re-arm those still waiting.

        Returns
        -------
        float or None
            Seconds until the next deadline, None when nothing is armed.
        """
        now = self._clock()
        with self._cond:
            due = [uid for uid, at in self._due.items() if at <= now]
            for uid in due:
                del self._due[uid]
        if due:
            self._settle_and_rearm(due)
        with self._cond:
            return self._wait_s()

    def _wait_s(self) -> float | None:
        """Seconds until the earliest deadline (caller holds the lock); None when none."""
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - self._clock())

    def _settle_and_rearm(self, due: list[str]) -> None:
        policy = self._policy
        try:
            left = self._settle(due)
        except Exception as exc:  # noqa: BLE001 - e.g. database down: try again later
            log.error("completion step failed: %s; retrying", type(exc).__name__)
            left = {uid: policy.error_retry_s for uid in due}
        now = self._clock()
        with self._cond:
            for uid, seconds in left.items():
                if uid not in self._due:  # a new instance re-armed it meanwhile: keep that
                    self._set(uid, now + max(policy.min_retry_s, seconds))

    def start(self) -> None:
        """Start the timer thread."""
        self._thread = threading.Thread(target=self._run, name="radflag-readiness", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (a completion step in progress finishes first)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            self.run_due()
            with self._cond:  # computed under the lock: an arm() now is never missed
                if self._stopping:
                    return
                wait_s = self._wait_s()
                if wait_s is None or wait_s > 0:
                    self._waiting_until = None if wait_s is None else self._clock() + wait_s
                    self._cond.wait(wait_s)
                    self._waiting_until = None


class ReadyQuietStudies:
    """The deadline's :data:`SettleStep`: the completion step, once per cluster.

    Runs :func:`db.queue.mark_ready` under the ``complete_studies`` advisory lock
    (:func:`db.locks.cluster_singleton`, the periodic job's lock; lease expiry and reclaim
    stay with the periodic job), hands the studies that became READY to ``on_ready``, and
    returns the quiet period left (:func:`db.queue.quiet_left`) of the due studies still
    RECEIVING: a later instance came in elsewhere, or another process held the lock.

    Parameters
    ----------
    engine
        The radflag database (for the advisory lock).
    sessions
        Its session factory.
    quiet_period_s
        ``completion.quiet_period_s``.
    on_ready
        Called with the Study Instance UIDs that became READY (e.g. wake the worker).
    """

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        quiet_period_s: float,
        on_ready: Callable[[list[str]], None],
    ) -> None:
        self._engine = engine
        self._sessions = sessions
        self._quiet_s = quiet_period_s
        self._on_ready = on_ready

    def __call__(self, study_uids: Collection[str]) -> dict[str, float]:
        """Ready every quiet study; return seconds left for ``study_uids`` still waiting."""
        set_thread_role("scheduler")
        with cluster_singleton(self._engine, "complete_studies") as mine:
            ready = mark_ready(self._sessions, self._quiet_s) if mine else []
        if ready:
            self._on_ready(ready)
        waiting = set(study_uids) - set(ready)
        return quiet_left(self._sessions, waiting, self._quiet_s) if waiting else {}


class ArmingSink:
    """Wraps the listener's sink: each new instance committed (re-)arms its study's deadline.

    Parameters
    ----------
    inner
        The sink that commits the instance (its errors propagate unchanged).
    arm
        Called with the Study Instance UID after a new instance was committed.
    """

    def __init__(self, inner: InstanceSink, arm: Callable[[str], None]) -> None:
        self._inner = inner
        self._arm = arm

    def store(self, instance: ReceivedInstance) -> bool:
        """Store through the inner sink; arm the study's deadline when the instance is new."""
        is_new = self._inner.store(instance)
        if is_new:
            self._arm(instance.study_instance_uid)
        return is_new
