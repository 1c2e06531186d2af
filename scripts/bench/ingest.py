"""Section (e): ingest of N x 2048^2 16-bit DX over 1 and 4 parallel associations.

A thin call into ``scripts/bench_ingest.py`` (its images, its tuned ``storescp +B -pdu
131072 --fork``, Orthanc and radflag receivers, parallel ``storescu`` associations, every
DCMTK/Orthanc process with ``TCP_NODELAY=1``), so the ingest benchmark exists once.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scripts.bench.stack import Deadline
from scripts.bench_ingest import Row
from scripts.bench_ingest import run_ingest as _run_ingest


@dataclass(frozen=True)
class IngestPlan:
    """What the section sends and how often.

    ``images`` of ``size``² over each association count, ``rounds`` times per receiver
    (receivers alternate; ratios are paired within a round).
    """

    images: int
    size: int
    associations: Sequence[int]
    rounds: int = 1


def run_ingest(plan: IngestPlan, work: Path, deadline: Deadline) -> list[Row]:
    """Every receiver at every association count, on the same files, ``plan.rounds`` times.

    Each ``storescu`` run is bounded by ``scripts/bench_ingest.py`` itself (900 s); the
    section is skipped by the caller when ``deadline`` has run out.
    """
    if deadline.left() <= 0:
        raise TimeoutError("no time left for the ingest section")
    try:
        return _run_ingest(
            plan.images, plan.associations, work / "ingest", size=plan.size, rounds=plan.rounds
        )
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work / "ingest")


__all__ = ["IngestPlan", "Row", "run_ingest"]
