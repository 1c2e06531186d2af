"""The measurements on the model and on a running ``radflag serve`` (sections a to d).

- :func:`bare_throughput`: what the daemon must do per image, nothing else -- read and decode
  the stored file (:func:`dicom_io.reader.read_image`), :func:`daemon.pipeline.model_input`,
  preprocess and forward at batch 16 (:meth:`model.infer.Classifier.classify`, under
  ``torch.inference_mode``, intra-op threads = cores);
- :func:`throughput`: from the first byte ``dcmsend`` sends to the last result object the PACS
  wrote;
- :func:`latency`: from the end of a 1-image study's C-STORE to its SR written by the PACS;
- :func:`peak_memory`: VmHWM of the serve process tree across one large study.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import torch

from daemon.pipeline import model_input
from dicom_io.reader import read_image
from model.bundle import Bundle
from model.infer import Classifier, select_device
from scripts.bench.corpus import Study, flatten
from scripts.bench.stack import Deadline, MemorySampler, Stack

POLL_S = 0.05
PROBE_TIMEOUT_S = 120.0
PENDING_STATES = ("RECEIVING", "READY", "PROCESSING", "DELIVERING")


@dataclass(frozen=True)
class Bare:
    """Section (a): bare model throughput."""

    images: int
    seconds: float
    threads: int
    batch_size: int
    refused: int

    @property
    def images_per_s(self) -> float:
        """Images per second."""
        return self.images / self.seconds


def bare_throughput(files: Sequence[Path], bundle: Bundle, batch_size: int = 16) -> Bare:
    """Decode, map and classify ``files`` in batches of ``batch_size`` (after a warm-up)."""
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    clf = Classifier(bundle, device=select_device("auto"), batch_size=batch_size)
    clf.classify([model_input(read_image(p)) for p in files[:2]])  # warm-up, not timed
    refused = 0
    start = time.perf_counter()
    for first in range(0, len(files), batch_size):
        items = [model_input(read_image(p)) for p in files[first : first + batch_size]]
        refused += sum(p.not_applicable is not None for p in clf.classify(items))
    return Bare(len(files), time.perf_counter() - start, threads, batch_size, refused)


def study_states(db: Path) -> dict[str, int] | None:
    """Studies per state in the serve process's SQLite database; None when it cannot be read.

    Read-only; while radflag writes, SQLite may refuse the read (``database is locked``).
    """
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT state, count(*) FROM studies GROUP BY state").fetchall()
    except sqlite3.Error:
        return None
    return {str(state): int(n) for state, n in rows}


def _nothing_pending(db: Path) -> bool:
    """Return True when the database was read and no study is in a pending state."""
    states = study_states(db)
    return states is not None and not any(n for s, n in states.items() if s in PENDING_STATES)


def wait_results(
    stack: Stack, expected: int, before: set[Path], deadline: Deadline, idle_s: float = 5.0
) -> list[Path]:
    """Wait until the PACS holds ``expected`` new files, or radflag has nothing left to send.

    "Nothing left" is no new file for ``idle_s`` and, twice in a row (a second apart), no
    study in a pending state (the shortfall then shows in the report). Returns the new files.
    """
    last_change, seen = time.monotonic(), 0
    while True:
        new = [p for p in stack.received() if p not in before]
        if len(new) >= expected:
            time.sleep(0.3)  # let the last file be written completely (its mtime is final)
            return new
        if len(new) != seen:
            last_change, seen = time.monotonic(), len(new)
        quiet = time.monotonic() - last_change
        if quiet > idle_s and _nothing_pending(stack.db_path):
            time.sleep(1.0)
            if _nothing_pending(stack.db_path) and len(stack.received()) == len(before) + len(new):
                return new
        if not stack.alive():
            raise RuntimeError(f"radflag serve died:\n{stack.log_tail()}")
        deadline.left()
        time.sleep(POLL_S)


@dataclass(frozen=True)
class EndToEnd:
    """Section (b): one ``radflag serve`` throughput run."""

    label: str
    studies: int
    images: int
    seconds: float
    received: int
    expected: int

    @property
    def studies_per_s(self) -> float:
        """Studies per second."""
        return self.studies / self.seconds

    @property
    def images_per_s(self) -> float:
        """Images per second."""
        return self.images / self.seconds


def throughput(stack: Stack, label: str, studies: Sequence[Study], deadline: Deadline) -> EndToEnd:
    """Send ``studies`` over one association; time to the last result object at the PACS."""
    before = set(stack.received())
    expected = len(studies) * len(stack.opts.outputs)
    start, _ = stack.send(flatten(studies), deadline)
    new = wait_results(stack, expected, before, deadline)
    last = max((p.stat().st_mtime for p in new), default=time.time())
    images = sum(len(s) for s in studies)
    return EndToEnd(label, len(studies), images, last - start, len(new), expected)


def _study_uid(study: Study) -> str:
    return str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)


def _latencies(stack: Stack, sent_at: dict[str, float], before: set[Path]) -> dict[str, float]:
    """Seconds from each study's last C-STORE to its first result at the PACS, where arrived."""
    out: dict[str, float] = {}
    for path in stack.received():
        if path in before:
            continue
        uid = stack.study_of(path)
        if uid in sent_at:
            lat = path.stat().st_mtime - sent_at[uid]
            out[uid] = min(lat, out.get(uid, lat))
    return out


def latency(
    stack: Stack, probes: Sequence[Study], ahead: Sequence[Study], deadline: Deadline
) -> list[float]:
    """Latencies of 1-image ``probes``, sent one by one after ``ahead`` (one association).

    Without ``ahead`` each probe waits for its result (at most ``PROBE_TIMEOUT_S``) before
    the next is sent (an idle radflag); with it, the probes are sent right behind the queued
    studies. Either way the function returns once every study sent has its results (radflag
    is idle again). A probe without a result is missing from the list.
    """
    before = set(stack.received())
    if ahead:
        stack.send(flatten(ahead), deadline)
    sent_at: dict[str, float] = {}
    for probe in probes:
        uid = _study_uid(probe)
        sent_at[uid] = stack.send(probe, deadline)[1]
        if not ahead:
            _wait_for_study(stack, uid, before, deadline)
            time.sleep(0.5)
    expected = (len(ahead) + len(probes)) * len(stack.opts.outputs)
    wait_results(stack, expected, before, deadline)
    return sorted(_latencies(stack, sent_at, before).values())


def _wait_for_study(stack: Stack, uid: str, before: set[Path], deadline: Deadline) -> None:
    """Wait (bounded) until a result of study ``uid`` is at the PACS."""
    end = time.monotonic() + PROBE_TIMEOUT_S
    while uid not in _latencies(stack, {uid: 0.0}, before) and time.monotonic() < end:
        if not stack.alive():
            raise RuntimeError(f"radflag serve died:\n{stack.log_tail()}")
        deadline.left()
        time.sleep(POLL_S)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of non-empty ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Memory:
    """Section (d): the serve process tree's memory around one study."""

    images: int
    shape: tuple[int, int]
    serve_hwm_mb: float
    children_hwm_mb: float
    peak_rss_mb: float
    idle_hwm_mb: float
    capped: bool
    received: int


def peak_memory(
    stack: Stack, sampler: MemorySampler, study: Study, shape: tuple[int, int], deadline: Deadline
) -> Memory:
    """Send one study; return the high-water marks once its results arrived."""
    sampler.sample()
    idle = sampler.serve_hwm_mb()
    before = set(stack.received())
    new: list[Path] = []
    try:  # the sampler kills radflag when the tree exceeds its cap
        stack.send(study, deadline)
        new = wait_results(stack, len(stack.opts.outputs), before, deadline)
    except RuntimeError:
        if not sampler.capped:
            raise
    sampler.sample()
    return Memory(
        images=len(study),
        shape=shape,
        serve_hwm_mb=sampler.serve_hwm_mb(),
        children_hwm_mb=sampler.children_hwm_mb(),
        peak_rss_mb=sampler.peak_rss_kb / 1024,
        idle_hwm_mb=idle,
        capped=sampler.capped,
        received=len(new),
    )
