"""Sender rounds on time: every ``delivery.check_interval_s``, and at once when kicked.

A study's outbox rows are committed by the worker (:func:`db.results.record_classification`);
waiting for the next periodic round would put up to one check interval between that commit
and the C-STORE to the PACS. :class:`RoundLoop` runs the rounds in one thread: it waits for
the interval *or* a :meth:`RoundLoop.kick`, so the worker (:class:`KickAfter`) and the sender
itself (a destination's association ended) start the next round right away. One thread means
one round at a time per process (APScheduler's ``max_instances=1``); a kick during a round
is remembered and starts the next round as soon as this one returns, never a second one
beside it. The periodic wake-up stays: retries after backoff, other processes' results,
entries whose claim lapsed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from daemon.worker import StudyHandler
from db.queue import ClaimedStudy

log = logging.getLogger(__name__)


class RoundLoop:
    """Run ``round_fn`` in one thread every ``interval_s`` and whenever :meth:`kick` is called.

    Parameters
    ----------
    round_fn
        One sender round (must return quickly; exceptions are logged and the loop goes on).
    interval_s
        Longest wait between two rounds.
    name
        Thread name.
    """

    def __init__(
        self, round_fn: Callable[[], None], interval_s: float, name: str = "radflag-sender-loop"
    ) -> None:
        self._round = round_fn
        self._interval_s = interval_s
        self._kicked = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the loop; the first round runs after one interval or the first kick."""
        self._thread.start()

    def kick(self) -> None:
        """Ask for a round now (or right after the one in progress)."""
        self._kicked.set()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop after the round in progress; return True when the thread ended in time."""
        self._stopping.set()
        self._kicked.set()
        if self._thread.ident is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._kicked.wait(self._interval_s)
            if self._stopping.is_set():
                return
            self._kicked.clear()  # before the round: a kick during it means one more round
            try:
                self._round()
            except Exception:
                log.exception("sender round failed")


class KickAfter:
    """A :class:`daemon.worker.StudyHandler` that calls ``after`` once a study is processed.

    The wrapped processor returns after the study's outcome (results and outbox rows) is
    committed, so ``after`` (the sender loop's :meth:`RoundLoop.kick`) sees its entries.
    """

    def __init__(self, inner: StudyHandler, after: Callable[[], None]) -> None:
        self._inner = inner
        self._after = after

    def process(self, claim: ClaimedStudy) -> None:
        """Process ``claim`` with the wrapped handler, then call ``after``."""
        try:
            self._inner.process(claim)
        finally:
            self._after()
