"""Drive deploy/compose.yaml with podman-compose: build, up, stop, down, exec, Orthanc REST."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "deploy" / "compose.yaml"
BUILD_SCRIPT = REPO_ROOT / "deploy" / "container" / "build-images.sh"
CONTAINERS_CONF = REPO_ROOT / "deploy" / "container" / "containers.conf"
ECHOSCU = "/usr/bin/echoscu"
T = TypeVar("T")


def require_containers() -> None:
    """Skip without podman + podman-compose; fail instead under RADFLAG_REQUIRE_CONTAINERS=1."""
    missing = [t for t in ("podman", "podman-compose") if shutil.which(t) is None]
    if not missing:
        return
    msg = f"container engine not available: {', '.join(missing)} missing"
    if os.environ.get("RADFLAG_REQUIRE_CONTAINERS", "") not in ("", "0"):
        pytest.fail(msg + " (RADFLAG_REQUIRE_CONTAINERS=1)")
    pytest.skip(msg)


def podman_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for podman: our containers.conf unless the caller set one."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    env.setdefault("PIP", f"{sys.executable} -m pip")  # whose pip configuration the build reads
    env.update(extra or {})
    return env


def run(cmd: list[str], *, env: Mapping[str, str], timeout_s: float) -> str:
    """Run ``cmd``; return stdout; raise with stdout+stderr on failure."""
    proc = subprocess.run(
        cmd, env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if proc.returncode != 0:
        output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output}")
    return proc.stdout


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 1.0) -> T:
    """Poll ``probe`` until it returns a value that is not None (compose does not wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class ComposeStack:
    """One compose project (unique name, its own volumes) of deploy/compose.yaml."""

    def __init__(self, project: str, env: Mapping[str, str]) -> None:
        self.project = project
        self.env = podman_env(env)

    def compose(self, *args: str, timeout_s: float = 300.0) -> str:
        """Run ``podman-compose -p <project> -f deploy/compose.yaml <args>``."""
        cmd = ["podman-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return run(cmd, env=self.env, timeout_s=timeout_s)

    def container(self, service: str) -> str:
        """Name of the service's container (podman-compose: ``<project>_<service>_1``)."""
        return f"{self.project}_{service}_1"

    def podman(self, *args: str, timeout_s: float = 120.0) -> str:
        """Run ``podman <args>``."""
        return run(["podman", *args], env=self.env, timeout_s=timeout_s)

    def radflag(self, *args: str) -> Any:
        """Run a ``radflag`` admin command in the radflag container; parse its JSON output."""
        out = self.podman(
            "exec",
            self.container("radflag"),
            "radflag",
            *args,
            "--config",
            "/etc/radflag/radflag.toml",
            "--format",
            "json",
        )
        return json.loads(out)

    def remove(self) -> None:
        """Remove containers, pod and the project's volumes (best effort)."""
        subprocess.run(
            ["podman-compose", "-p", self.project, "-f", str(COMPOSE_FILE), "down", "-v"],
            env=self.env,
            capture_output=True,
            timeout=180,
            check=False,
        )
        vols = subprocess.run(
            ["podman", "volume", "ls", "-q", "--filter", f"name={self.project}_"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout.split()
        if vols:
            subprocess.run(
                ["podman", "volume", "rm", "-f", *vols],
                env=self.env,
                capture_output=True,
                timeout=60,
                check=False,
            )


class OrthancRest:
    """Minimal client of the compose Orthanc's REST API (basic auth, 127.0.0.1)."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        """Send one request; return the decoded JSON answer."""
        req = urllib.request.Request(
            self.base + path, data=body, method=method, headers=self.headers
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def answers(self) -> bool | None:
        """True once ``/system`` answers; None while it does not."""
        try:
            self.request("GET", "/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return None

    def upload(self, path: Path) -> str:
        """POST a DICOM file to ``/instances``; return its Orthanc study ID."""
        return str(self.request("POST", "/instances", path.read_bytes())["ParentStudy"])

    def study_modalities(self, study_id: str) -> set[str]:
        """Modalities of the study's series."""
        series = self.request("GET", f"/studies/{study_id}/series")
        return {str(s["MainDicomTags"].get("Modality", "")) for s in series}


def echo(port: int, calling_ae: str, called_ae: str = "RADFLAG") -> bool | None:
    """One C-ECHO (DCMTK echoscu); True when answered, None otherwise."""
    proc = subprocess.run(
        [ECHOSCU, "-aet", calling_ae, "-aec", called_ae, "-to", "3", "127.0.0.1", str(port)],
        capture_output=True,
        timeout=15,
        check=False,
    )
    return True if proc.returncode == 0 else None
