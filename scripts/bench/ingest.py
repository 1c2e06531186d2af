"""Section (e): ingest of N x 2048^2 16-bit DX over 1 and 4 parallel associations.

A thin call into ``scripts/bench_ingest.py`` (its images, its tuned ``storescp +B -pdu
131072 --fork``, Orthanc and radflag receivers, parallel ``storescu`` associations, every
DCMTK/Orthanc process with ``TCP_NODELAY=1``), so the ingest benchmark exists once.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

from scripts.bench.stack import Deadline
from scripts.bench_ingest import Row
from scripts.bench_ingest import run_ingest as _run_ingest


def run_ingest(
    n_images: int,
    size: int,
    associations: Sequence[int],
    work: Path,
    deadline: Deadline,
) -> list[Row]:
    """Every receiver at every association count, on the same ``n_images`` files.

    Each ``storescu`` run is bounded by ``scripts/bench_ingest.py`` itself (900 s); the
    section is skipped by the caller when ``deadline`` has run out.
    """
    if deadline.left() <= 0:
        raise TimeoutError("no time left for the ingest section")
    try:
        return _run_ingest(n_images, associations, work / "ingest", size=size)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work / "ingest")


__all__ = ["Row", "run_ingest"]
