"""Helpers of the administrator tests: the real ``radflag`` command and ``radflag serve``.

Every configuration written here uses paths RELATIVE to the configuration file (issue 14:
they resolve against the file, not the working directory), and commands run from another
working directory to prove it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peers.dcmtk import echoscu
from tests.peers.netns import NetNamespace

RADFLAG = Path(sys.executable).with_name("radflag")


def toml_value(value: Any) -> str:
    """Render a TOML scalar or list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, sections: Mapping[str, Any]) -> Path:
    """Write ``{"section": {key: value}, "destinations": [{...}]}`` as TOML."""
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def base_sections(port: int, **overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A fast-timer configuration with relative data paths (``data/…`` next to the file)."""
    sections: dict[str, Any] = {
        "listener": {
            "ae_title": "RADFLAG",
            "host": "127.0.0.1",
            "port": port,
            "shutdown_grace_s": 5,
        },
        "storage": {"spool_dir": "data/spool", "results_dir": "data/results"},
        "database": {"url": "sqlite:///data/radflag.db"},
        "completion": {"quiet_period_s": 1.0, "check_interval_s": 0.5},
        "worker": {"device": "cpu", "poll_interval_s": 0.5},
        "delivery": {"backoff_base_s": 1.0, "check_interval_s": 0.5},
        "privacy": {"pseudonym_key": "admin-test-key"},
        "logging": {"format": "text"},
    }
    for name, values in overrides.items():
        if isinstance(values, list):
            sections[name] = values
        else:
            sections[name] = {**sections.get(name, {}), **values}
    return sections


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any ``RADFLAG_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADFLAG_")}
    env.update(extra)
    return env


def radflag(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout_s: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run the real ``radflag`` console command."""
    if not RADFLAG.exists():
        pytest.skip(f"{RADFLAG} not installed (pip install -e .)")
    return subprocess.run(
        [str(RADFLAG), *args],
        cwd=cwd,
        env=dict(env or clean_env()),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Serve:
    """A running ``radflag serve`` and its configuration."""

    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    log_path: Path

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.config.parent / 'data' / 'radflag.db'}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def launch(ns: NetNamespace, config: Path, port: int, *, cwd: Path) -> Serve:
    """Start ``radflag serve --config`` in ``ns`` from ``cwd``; return once it answers C-ECHO."""
    if not RADFLAG.exists():
        pytest.skip(f"{RADFLAG} not installed (pip install -e .)")
    log_path = config.with_suffix(".log")
    with log_path.open("wb") as log:
        proc = ns.popen(
            [str(RADFLAG), "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            cwd=cwd,
        )
    serve = Serve(proc=proc, port=port, config=config, log_path=log_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"radflag serve exited early:\n{serve.log()}")
        if echoscu(port, ns=ns, called_aet="RADFLAG", timeout_s=5).returncode == 0:
            return serve
        time.sleep(0.5)
    serve.stop()
    raise AssertionError(f"radflag serve did not answer C-ECHO:\n{serve.log()}")


@pytest.fixture
def serves() -> Iterator[list[Serve]]:
    """Collects the ``radflag serve`` processes a test starts; stopped at teardown."""
    running: list[Serve] = []
    yield running
    for s in running:
        s.stop()


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 0.5 s until true or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
