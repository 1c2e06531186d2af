"""Section (e): ingest of N x 2048^2 16-bit DX over 1 and 4 parallel associations.

Uses ``scripts/bench_ingest.py`` as it is (its images, its Orthanc and radflag receivers,
its :class:`Row`) and adds what it lacks: the DCMTK ``storescp`` baseline tuned as its users
would run it (bit-preserving ``+B``, 128 KiB PDU, ``--fork``) and parallel associations (the
files split into contiguous chunks, one ``storescu`` per chunk, started together). Every
DCMTK/Orthanc process gets ``TCP_NODELAY=1`` from the caller's environment
(:func:`nodelay`). Receivers store durably as they do by default; radflag is its full
ingest path (fsync, atomic rename, SQLite commit per instance).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from scripts.bench.stack import Deadline
from scripts.bench_ingest import (
    MAX_PDU_BYTES,
    Row,
    Target,
    TargetFactory,
    make_images,
    orthanc_target,
    radflag_target,
)
from tests.peers.dcmtk import STORESCU, StoreSCP
from tests.peers.netns import NetNamespace

TUNED_STORESCP = "storescp +B -pdu 131072 --fork"


@contextmanager
def nodelay() -> Iterator[None]:
    """Set ``TCP_NODELAY=1`` (read by DCMTK and Orthanc) for the processes started inside."""
    old = os.environ.get("TCP_NODELAY")
    os.environ["TCP_NODELAY"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TCP_NODELAY"]
        else:
            os.environ["TCP_NODELAY"] = old


@contextmanager
def tuned_dcmtk_target(ns: NetNamespace, work: Path) -> Iterator[Target]:
    """DCMTK ``storescp`` tuned as its users run it.

    Data sets written as received (``+B``), 128 KiB PDU, one process per association
    (``--fork``) so parallel associations are served in parallel.
    """
    scp = StoreSCP(
        work / "storescp",
        ns=ns,
        aet="STORESCP",
        extra_args=["+B", "-pdu", str(MAX_PDU_BYTES), "--fork"],
    )
    with scp:
        yield Target(TUNED_STORESCP, "STORESCP", scp.port, lambda: len(scp.files()))


def _chunks(files: Sequence[Path], n: int) -> list[list[Path]]:
    size = -(-len(files) // n)
    return [list(files[i : i + size]) for i in range(0, len(files), size)]


def send_parallel(
    ns: NetNamespace, target: Target, files: Sequence[Path], associations: int, timeout_s: float
) -> float:
    """Send ``files`` over ``associations`` concurrent ``storescu`` runs; return wall seconds."""
    base = [str(STORESCU), "-aet", "BENCH", "-aec", target.aet, "127.0.0.1", str(target.port)]
    start = time.perf_counter()
    procs = [
        ns.popen([*base, *map(str, chunk)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for chunk in _chunks(files, associations)
    ]
    failed = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            failed.append(err.decode(errors="replace")[-1000:])
    elapsed = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"storescu -> {target.name} failed: {failed[0]}")
    return elapsed


def measure_target(
    ns: NetNamespace,
    make: TargetFactory,
    files: Sequence[Path],
    associations: int,
    work: Path,
    deadline: Deadline,
) -> Row:
    """One fresh receiver, ``files`` over ``associations`` parallel associations."""
    mbytes = sum(f.stat().st_size for f in files) / 1e6
    run_dir = work / f"run-{time.monotonic_ns()}"
    try:
        with make(ns, run_dir) as target:
            seconds = send_parallel(ns, target, files, associations, deadline.left())
            end = time.monotonic() + min(60.0, deadline.left())
            while target.count() < len(files) and time.monotonic() < end:
                time.sleep(0.1)
            stored = target.count()
            if stored != len(files):
                raise RuntimeError(f"{target.name} stored {stored} of {len(files)}")
            mode = f"{associations} association{'s' if associations > 1 else ''}"
            print(f"         ingest {target.name:32s} {mode:15s} {seconds:7.2f} s", flush=True)
            return Row(target.name, mode, len(files), seconds, mbytes)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_ingest(
    n_images: int,
    size: int,
    associations: Sequence[int],
    work: Path,
    deadline: Deadline,
) -> list[Row]:
    """Every receiver at every association count, on the same ``n_images`` files."""
    files = make_images(work / "ingest-images", n_images, size)
    rows: list[Row] = []
    try:
        with nodelay(), NetNamespace(max_lifetime_s=deadline.left() + 60) as ns:
            for make in (tuned_dcmtk_target, orthanc_target, radflag_target):
                for k in associations:
                    rows.append(measure_target(ns, make, files, k, work, deadline))
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work / "ingest-images")
    return rows
