"""Smoke test of ``scripts/bench_pipeline.py``: it runs at tiny sizes and prints its table.

Not a timing test: the figures are only checked to exist, be positive and come from results
that really arrived (every study sent got its SR at the PACS). Also checked: the temporary
folder is gone and no process started for the run is left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, shared_path
from tests.peers.dcmtk import dcmtk_available
from tests.peers.fixtures import require_namespaces
from tests.peers.orthanc import orthanc_available

SCRIPT = REPO_ROOT / "scripts" / "bench_pipeline.py"
TINY = ["--size", "192x160", "--distinct", "2", "--max-minutes", "5"]

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk, pytest.mark.shared]


def _run(tmp_path: Path, *args: str) -> tuple[str, dict[str, float]]:
    require_namespaces()
    if not dcmtk_available():
        pytest.skip("DCMTK not installed in /usr/bin")
    data = shared_path("cxr", "kermany-pneumonia-train")
    out = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--data", str(data), "--json", str(out), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = re.search(r"^work folder: (\S+)$", done.stdout, re.MULTILINE)
    assert work is not None, done.stdout
    assert not Path(work.group(1)).exists()
    assert not _processes_mentioning(work.group(1))
    return done.stdout, json.loads(out.read_text())


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (the run's work folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def _row(table: str, prefix: str) -> str:
    rows = [line for line in table.splitlines() if line.startswith(f"| {prefix}")]
    assert len(rows) == 1, (prefix, table)
    return rows[0]


def test_model_and_serve_sections_print_the_table(tmp_path: Path) -> None:
    table, figures = _run(
        tmp_path,
        "--sections", "bare,e2e,latency,memory",
        "--variants", "sr",
        "--studies", "3",
        "--probes", "2",
        "--queue", "2",
        "--images", "4",
        "--memory-size", "128x96",
    )  # fmt: skip
    assert figures["bare_images_per_s"] > 0
    assert figures["e2e SR only, 1-image studies / bare"] > 0
    row = _row(table, "(b) e2e SR only, 1-image studies")
    assert "recv." not in row  # every study's SR arrived
    assert "x bare" in row and ">= 0.90" in row
    for name in ("idle", "queued"):
        assert 0 < figures[f"latency {name} p50 s"] <= figures[f"latency {name} p95 s"]
    assert "p95 <= 2.5 s" in _row(table, "(c) latency, idle")
    assert _row(table, "(c) latency, 2 studies queued ahead")
    assert figures["memory 4 images serve VmHWM MiB"] >= figures["memory 1 images serve VmHWM MiB"]
    assert figures["memory 1 images serve VmHWM MiB"] > 50  # a python process with torch
    assert "command: " in table and "load average" in table


@pytest.mark.orthanc
def test_ingest_section_prints_the_ratios(tmp_path: Path) -> None:
    if not orthanc_available():
        pytest.skip("Orthanc not installed (/usr/sbin/Orthanc)")
    table, figures = _run(
        tmp_path,
        "--sections",
        "ingest",
        "--ingest-images",
        "4",
        "--ingest-size",
        "128",
        "--ingest-rounds",
        "2",
    )
    for target in ("DCMTK storescp", "Orthanc", "radflag"):
        for mode in ("1 association", "4 associations"):
            assert figures[f"ingest {target} {mode} images/s"] > 0
    assert _row(table, "(e) ingest radflag / DCMTK storescp, 4 associations")
    assert "median of 2 rounds" in _row(table, "(e) ingest radflag / Orthanc, 1 association")
    assert figures["ingest radflag / Orthanc 1 association"] > 0
    assert "(a) bare" not in table


def test_worker_settings_reach_the_serve_configuration(tmp_path: Path) -> None:
    """``--worker KEY=VALUE`` lands in the ``[worker]`` section radflag serve reads."""
    sys.path.insert(0, str(REPO_ROOT))
    from daemon.settings import load_settings
    from scripts.bench.stack import write_config
    from scripts.bench_pipeline import parse_args, serve_options

    args = parse_args(["--worker", "studies_in_flight=4", "--worker", "prepare_threads = 2"])
    opts = serve_options(args, ("SR", "SC"))
    assert "worker.studies_in_flight=4" in opts.describe()
    path = write_config(tmp_path / "radflag.toml", tmp_path / "data", 11104, 11105, opts)
    worker = load_settings(path, environ={}).worker
    assert (worker.studies_in_flight, worker.prepare_threads) == (4, 2)
    with pytest.raises(SystemExit):
        parse_args(["--worker", "studies_in_flight"])
