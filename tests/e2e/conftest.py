"""Run ``radflag serve`` as a real process inside a private network namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peers.dcmtk import echoscu
from tests.peers.fixtures import netns, orthanc, storescp  # noqa: F401 - fixtures
from tests.peers.netns import NetNamespace

RADFLAG = Path(sys.executable).with_name("radflag")


@dataclass
class ServeProcess:
    """A running ``radflag serve``."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'radflag.db'}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError("radflag did not stop within the grace period") from None
        return int(self.proc.returncode)


def write_config(
    path: Path,
    data_dir: Path,
    port: int,
    destinations: list[tuple[str, str, int]],
    delivery: dict[str, float] | None = None,
    applicability_gate: bool = True,
) -> Path:
    """A radflag TOML config for tests: fast timers, SQLite under ``data_dir``.

    ``delivery`` adds numeric ``[delivery]`` settings (e.g. ``claim_lease_s``).
    """
    lines = [
        "[listener]",
        'ae_title = "RADFLAG"',
        'host = "127.0.0.1"',
        f"port = {port}",
        "shutdown_grace_s = 10",
        "[storage]",
        f'spool_dir = "{data_dir / "spool"}"',
        f'results_dir = "{data_dir / "results"}"',
        "[database]",
        f'url = "sqlite:///{data_dir / "radflag.db"}"',
        "[completion]",
        "quiet_period_s = 1.0",
        "check_interval_s = 0.5",
        "[worker]",
        'device = "auto"',
        "poll_interval_s = 0.5",
        "[delivery]",
        "backoff_base_s = 1.0",
        "check_interval_s = 0.5",
        *(f"{key} = {value}" for key, value in (delivery or {}).items()),
        "[models]",
        f"applicability_gate = {str(applicability_gate).lower()}",
    ]
    for name, aet, dport in destinations:
        lines += [
            "[[destinations]]",
            f'name = "{name}"',
            f'ae_title = "{aet}"',
            'host = "127.0.0.1"',
            f"port = {dport}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def launch_serve(
    ns: NetNamespace,
    tmp_path: Path,
    destinations: list[tuple[str, str, int]],
    delivery: dict[str, float] | None = None,
    applicability_gate: bool = True,
) -> ServeProcess:
    """Start ``radflag serve`` inside ``ns``; return once it answers C-ECHO (caller stops it).

    A second launch with the same ``tmp_path`` reuses the database and spool (a restart).
    """
    if not RADFLAG.exists():
        pytest.skip(f"{RADFLAG} not installed (pip install -e .)")
    data_dir = tmp_path / "radflag-data"
    port = ns.free_port()
    cfg = write_config(
        tmp_path / "radflag.toml", data_dir, port, destinations, delivery, applicability_gate
    )
    log_path = tmp_path / f"radflag-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADFLAG_")}
    with log_path.open("wb") as log:
        proc = ns.popen(
            [str(RADFLAG), "serve", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    serve = ServeProcess(proc=proc, port=port, data_dir=data_dir, log_path=log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"radflag serve exited early:\n{serve.log()}")
        if echoscu(port, ns=ns, called_aet="RADFLAG", timeout_s=5).returncode == 0:
            return serve
        time.sleep(0.5)
    serve.stop()
    raise AssertionError(f"radflag serve did not answer C-ECHO:\n{serve.log()}")


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[object]:
    """Start ``radflag serve`` in a namespace (see :func:`launch_serve`); stopped at teardown."""
    running: list[ServeProcess] = []

    def _start(
        ns: NetNamespace, destinations: list[tuple[str, str, int]], **options: Any
    ) -> ServeProcess:
        serve = launch_serve(ns, tmp_path, destinations, **options)
        running.append(serve)
        return serve

    yield _start
    for serve in running:
        serve.stop()
