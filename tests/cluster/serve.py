"""Launch real ``radflag serve`` processes on 127.0.0.1 that share one database and store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers.dcmtk import echoscu

RADFLAG = Path(sys.executable).with_name("radflag")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Serve:
    """One running ``radflag serve``."""

    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def write_config(
    path: Path,
    *,
    db_url: str,
    store: Path,
    port: int,
    bundle: Path,
    pacs_port: int,
    lease_s: float = 6.0,
) -> Path:
    """A test configuration: fast timers, a short lease, one destination (SR only)."""
    lines = [
        "[listener]",
        'ae_title = "RADFLAG"',
        'host = "127.0.0.1"',
        f"port = {port}",
        "shutdown_grace_s = 5",
        "[storage]",
        f'spool_dir = "{store / "spool"}"',
        f'results_dir = "{store / "results"}"',
        "[database]",
        f'url = "{db_url}"',
        "[completion]",
        "quiet_period_s = 1.0",
        "check_interval_s = 0.5",
        "[worker]",
        'device = "cpu"',
        "poll_interval_s = 0.3",
        f"lease_s = {lease_s}",
        f"heartbeat_interval_s = {lease_s / 4}",
        "[models]",
        f'bundles = ["{bundle}"]',
        "[privacy]",
        'pseudonym_key = "cluster-test"',
        "[delivery]",
        "backoff_base_s = 0.5",
        "backoff_max_s = 2.0",
        "check_interval_s = 0.5",
        "[[destinations]]",
        'name = "pacs"',
        'ae_title = "PACS"',
        'host = "127.0.0.1"',
        f"port = {pacs_port}",
        'outputs = ["SR"]',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(config: Path, port: int, log_path: Path, roles: str | None = None) -> Serve:
    """Start ``radflag serve``; return once it answers C-ECHO (listener) or has started."""
    if not RADFLAG.exists():
        pytest.skip(f"{RADFLAG} not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADFLAG_")}
    argv = [str(RADFLAG), "serve", "--config", str(config)]
    if roles:
        argv += ["--roles", roles]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    serve = Serve(proc=proc, port=port, config=config, log_path=log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"radflag serve exited early:\n{serve.log()[-3000:]}")
        if roles is not None and "listener" not in roles:
            if "radflag started" in serve.log():
                return serve
        elif echoscu(port, called_aet="RADFLAG", timeout_s=5).returncode == 0:
            return serve
        time.sleep(0.3)
    serve.stop()
    raise AssertionError(f"radflag serve did not start:\n{serve.log()[-3000:]}")
