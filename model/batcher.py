"""A micro-batcher: gathers items submitted from many threads into batches for one device.

Callers (one thread per study in flight) :meth:`MicroBatcher.submit` an item and get a
:class:`concurrent.futures.Future`; a single batcher thread takes up to ``max_batch`` items
from a bounded queue, waiting at most ``max_latency_s`` after the first one for more, and runs
them in one call. Items from several studies share a batch; each future gets its own item's
result. The queue is bounded: :meth:`submit` blocks while ``max_pending`` items wait
(backpressure). When a batch fails, its items are run one at a time, so a bad item fails only
its own future (its study), never its batch-mates'.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class BatcherStopped(RuntimeError):
    """The batcher was stopped: it takes no more items."""


@dataclass(frozen=True)
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: Future[ResultT]


@dataclass(frozen=True)
class BatcherConfig:
    """How a :class:`MicroBatcher` forms batches.

    Attributes
    ----------
    max_batch
        Largest batch (the model's batch size).
    max_latency_s
        Longest wait after a batch's first item for more items (the flush bound).
    max_pending
        Items that may wait in the queue; :meth:`MicroBatcher.submit` blocks beyond it.
    """

    max_batch: int = 16
    max_latency_s: float = 0.05
    max_pending: int = 64

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_pending < 1 or self.max_latency_s < 0:
            raise ValueError(f"invalid batcher configuration {self}")


class MicroBatcher(Generic[ItemT, ResultT]):
    """Run ``run`` on batches of submitted items from one thread (see the module docstring).

    Parameters
    ----------
    run
        Returns one result per item, in order; may raise.
    config
        Batch size, latency bound and queue bound.
    name
        Name of the batcher thread.
    """

    def __init__(
        self,
        run: Callable[[Sequence[ItemT]], Sequence[ResultT]],
        config: BatcherConfig,
        name: str = "radflag-batcher",
    ) -> None:
        self._run_batch = run
        self.config = config
        self._queue: queue.Queue[_Pending[ItemT, ResultT] | None] = queue.Queue(
            maxsize=config.max_pending
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.batches = 0
        self.items = 0

    def start(self) -> MicroBatcher[ItemT, ResultT]:
        """Start the batcher thread; return self."""
        self._thread.start()
        return self

    def submit(self, item: ItemT) -> Future[ResultT]:
        """Queue ``item``; block while the queue is full; return the future of its result.

        Raises
        ------
        BatcherStopped
            When the batcher is stopping or stopped.
        """
        future: Future[ResultT] = Future()
        pending = _Pending(item, future)
        while True:
            if self._stopping.is_set():
                raise BatcherStopped("the batcher is stopped")
            try:
                self._queue.put(pending, timeout=0.1)
                return future
            except queue.Full:
                continue

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Run what is queued, then stop; return True when the thread ended in time."""
        self._stopping.set()
        if not self._thread.is_alive():
            return True
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return False
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._fail_leftovers()
                return
            batch, ended = self._gather(first)
            self._run(batch)
            if ended:
                self._fail_leftovers()
                return

    def _gather(
        self, first: _Pending[ItemT, ResultT]
    ) -> tuple[list[_Pending[ItemT, ResultT]], bool]:
        """Collect items after ``first`` until the batch is full or the latency bound is hit."""
        batch = [first]
        deadline = time.monotonic() + self.config.max_latency_s
        while len(batch) < self.config.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _run(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        """Run one batch; on failure run its items one by one (a bad item fails alone)."""
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        self.items += len(live)
        try:
            results = self._call([p.item for p in live])
        except Exception as exc:  # noqa: BLE001 - handed to the callers' futures
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            log.warning("batch of %d failed (%s); running its items one by one", len(live), exc)
            for pending in live:
                try:
                    (result,) = self._call([pending.item])
                    pending.future.set_result(result)
                except Exception as item_exc:  # noqa: BLE001
                    pending.future.set_exception(item_exc)
            return
        for pending, result in zip(live, results, strict=True):
            pending.future.set_result(result)

    def _call(self, items: list[ItemT]) -> Sequence[ResultT]:
        results = self._run_batch(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch of {len(items)} items gave {len(results)} results")
        return results

    def _fail_leftovers(self) -> None:
        """Fail anything submitted after the stop marker (a race with :meth:`stop`)."""
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return
            if pending is not None and pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(BatcherStopped("the batcher stopped"))
