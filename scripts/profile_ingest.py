#!/usr/bin/env python
"""Where the time of one C-STORE goes in radflag's listener (a measurement, not a test).

Starts ``radflag serve``'s listener as shipped (SQLite database, no models) on 127.0.0.1,
sends N x 2048^2 16-bit DX images with DCMTK ``storescu`` (``TCP_NODELAY=1``) over one
association, and wraps the functions of each stage with wall-clock counters:

- socket receive (``WireSocket.recv``), PDU decode (non-P-DATA PDUs only), DIMSE reassembly
  (``DIMSEMessage.decode_msg``), of which the file writes -- pynetdicom's reader thread;
- data set parse, file fsync, directory fsync, sink (database commit) and response send --
  the association thread, inside the C-STORE handler.

Stages run in two threads, so they can overlap; the table also gives the wall time per image.
A second table follows one C-STORE from its first data fragment to the next one's (medians
over the images): receiving, the association thread picking the message up, the handler's
parse + durable placing (fsync, link, directory fsync), its database commit, pynetdicom
queuing the response, the reader sending it, and the sender's turn-around. On one
association their sum is the time per image.

Usage (from the repository root)::

    .venv/bin/python scripts/profile_ingest.py --images 50 --port 21100
    .venv/bin/python scripts/profile_ingest.py --images 40 --alternate-writeback 8

``--alternate-writeback ROUNDS`` alternates writeback while receiving (as shipped,
:mod:`dicom_io.incoming`) with writeback off and prints paired per-C-STORE medians.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pynetdicom import dimse_messages, dul, transport  # noqa: E402

import daemon.sink  # noqa: E402
import dicom_io.incoming  # noqa: E402
import dicom_io.scp  # noqa: E402
import dicom_io.spool  # noqa: E402
import dicom_io.wire  # noqa: E402
from daemon.app import Radflag  # noqa: E402
from daemon.settings import Settings  # noqa: E402
from dicom_io.scp import Listener  # noqa: E402
from scripts.bench_ingest import make_images  # noqa: E402
from tests.peers.dcmtk import STORESCU  # noqa: E402

_totals: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)
_lock = threading.Lock()
_marks: list[tuple[str, float]] = []

TIMELINE = (
    ("first data fragment", "message complete", "receive (first -> last fragment)"),
    ("message complete", "handler start", "association thread picks it up"),
    ("handler start", "placed", "parse + fsync + link + directory fsync"),
    ("placed", "handler end", "database commit (sink)"),
    ("handler end", "response queued", "pynetdicom queues the response"),
    ("response queued", "response sent", "reader sends the response"),
    ("response sent", "next first data fragment", "sender's turn-around"),
)
"""The per-C-STORE intervals: (from mark, to mark, label)."""


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            with _lock:
                _totals[name] += elapsed
                _counts[name] += 1

    return wrapper


def _marked(
    name: str, fn: Callable[..., Any], when: Callable[[Any], bool] = bool
) -> Callable[..., Any]:
    """Wrap ``fn`` to record ``(name, time)`` after it returns (when ``when(result)``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if when(result):
            _marks.append((name, time.perf_counter()))
        return result

    return wrapper


def _before(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` to record ``(name, time)`` before it runs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _marks.append((name, time.perf_counter()))
        return fn(*args, **kwargs)

    return wrapper


def timeline_medians() -> list[tuple[str, float]]:
    """Median milliseconds of each :data:`TIMELINE` interval, then of the whole C-STORE."""
    images: list[dict[str, float]] = []
    for name, at in _marks:
        if name == "first data fragment":
            images.append({})
        if images and name not in images[-1]:
            images[-1][name] = at
    for image, following in zip(images, images[1:], strict=False):
        image["next first data fragment"] = following["first data fragment"]
    rows = []
    for start, end, label in (*TIMELINE, ("first data fragment", "next first data fragment", "")):
        spans = [i[end] - i[start] for i in images if start in i and end in i]
        rows.append((label or "one C-STORE", statistics.median(spans) * 1000 if spans else 0.0))
    return rows


@contextmanager
def instrumented() -> Iterator[None]:
    """Wrap the stage functions (restored on exit)."""
    patches: list[tuple[Any, str, Any]] = [
        (dicom_io.wire.WireSocket, "recv", "socket receive"),
        (dicom_io.incoming.IncomingFile, "write", "file write while receiving"),
        (dicom_io.spool.Spool, "place_incoming", "spool place (fsyncs + link)"),
        (dul.DULServiceProvider, "_decode_pdu", "PDU decode"),
        (dimse_messages.DIMSEMessage, "decode_msg", "DIMSE reassembly"),
        (dicom_io.scp, "handle_store", "C-STORE handler (all below)"),
        (dicom_io.wire, "read_data_set", "data set parse (no pixels)"),
        (dicom_io.incoming.IncomingFile, "sync", "file fsync"),
        (dicom_io.spool, "_fsync_dir", "directory fsync"),
        (daemon.sink.DatabaseSink, "store", "sink: database commit"),
        (transport.AssociationSocket, "send", "socket send (response)"),
    ]
    originals = []
    for owner, attr, name in patches:
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        originals.append((owner, attr, original))
        setattr(owner, attr, _timed(name, original))
    marks: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
        (Listener, "_open_incoming", functools.partial(_before, "first data fragment")),
        (dimse_messages.DIMSEMessage, "decode_msg", functools.partial(_marked, "message complete")),
        (dicom_io.scp, "handle_store", functools.partial(_before, "handler start")),
        (dicom_io.spool.Spool, "place_incoming", functools.partial(_marked, "placed", when=_any)),
        (dul.DULServiceProvider, "send_pdu", functools.partial(_before, "response queued")),
        (
            transport.AssociationSocket,
            "send",
            functools.partial(_marked, "response sent", when=_any),
        ),
    ]
    for owner, attr, wrap in marks:
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        originals.append((owner, attr, original))
        setattr(owner, attr, wrap(getattr(owner, attr)))
    handler = dicom_io.scp.handle_store
    dicom_io.scp.handle_store = _marked("handler end", handler, when=_any)
    originals.append((dicom_io.scp, "handle_store", handler))
    try:
        yield
    finally:
        for owner, attr, original in reversed(originals):
            setattr(owner, attr, original)


def _any(result: Any) -> bool:
    return True


def _settings(work: Path, port: int) -> Settings:
    return Settings.model_validate(
        {
            "listener": {"ae_title": "RADFLAG", "host": "127.0.0.1", "port": port},
            "storage": {"spool_dir": str(work / "spool"), "results_dir": str(work / "res")},
            "database": {"url": f"sqlite:///{work / 'radflag.db'}"},
            "completion": {"quiet_period_s": 86400},
            "privacy": {"pseudonym_key": "profile"},
            "logging": {"level": "WARNING"},
        }
    )


def run_once(files: list[Path], work: Path, port: int) -> float:
    """Send ``files`` over one association to a fresh listener in ``work``; wall seconds."""
    _totals.clear()
    _counts.clear()
    _marks.clear()
    with instrumented():
        app = Radflag(_settings(work, port), models=[])
        app.start()
        try:
            argv = [str(STORESCU), "-aec", "RADFLAG", "127.0.0.1", str(port)]
            env = {**os.environ, "TCP_NODELAY": "1"}
            start = time.perf_counter()
            subprocess.run([*argv, *map(str, files)], check=True, env=env, timeout=600)
            return time.perf_counter() - start
        finally:
            app.stop()


def print_tables(n: int, size: int, wall: float) -> None:
    """Print the per-stage table and the per-C-STORE timeline of the last :func:`run_once`."""
    print(
        f"{n} images of {size}^2, one association: {wall:.2f} s, "
        f"{n / wall:.1f} images/s, {wall / n * 1000:.1f} ms per image\n"
    )
    print("| stage | calls per image | ms per image | % of wall |")
    print("|---|---:|---:|---:|")
    for name, total in _totals.items():
        print(
            f"| {name} | {_counts[name] / n:.1f} | {total / n * 1000:.2f} "
            f"| {total / wall * 100:.0f} |"
        )
    print("\n| one C-STORE, in order | median ms |\n|---|---:|")
    for label, ms in timeline_medians():
        print(f"| {label} | {ms:.2f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


def alternate_writeback(files: list[Path], work: Path, port: int, rounds: int) -> None:
    """Alternate writeback while receiving (as shipped) and off; paired per-C-STORE medians.

    Each round runs both, in alternating order, each against a fresh listener; the median
    time of one C-STORE (first data fragment to the next one's) is compared per round, so
    load changes between rounds cancel out.
    """
    shipped = dicom_io.incoming.start_writeback
    times: dict[str, list[float]] = {"writeback": [], "no writeback": []}
    for r in range(rounds):
        order = list(times) if r % 2 == 0 else list(times)[::-1]
        for name in order:
            on = name == "writeback"
            dicom_io.incoming.start_writeback = shipped if on else dicom_io.incoming._no_writeback
            try:
                run_once(files, work / f"{r}-{'on' if on else 'off'}", port)
            finally:
                dicom_io.incoming.start_writeback = shipped
            times[name].append(timeline_medians()[-1][1])
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in times.items()))
    ratios = [a / b for a, b in zip(times["writeback"], times["no writeback"], strict=True)]
    print(
        f"median one C-STORE: writeback {statistics.median(times['writeback']):.2f} ms, "
        f"no writeback {statistics.median(times['no writeback']):.2f} ms; paired ratio "
        f"median {statistics.median(ratios):.3f}; load average {os.getloadavg()[0]:.2f}"
    )


def main() -> int:
    """Run and print the per-stage table (or alternate writeback on and off)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--port", type=int, default=21100)
    parser.add_argument(
        "--alternate-writeback",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="alternate writeback while receiving on/off for ROUNDS rounds (paired medians)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="radflag-profile-"))
    try:
        files = make_images(work / "images", args.images, args.size)
        if args.alternate_writeback:
            alternate_writeback(files, work, args.port, args.alternate_writeback)
        else:
            print_tables(args.images, args.size, run_once(files, work, args.port))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
