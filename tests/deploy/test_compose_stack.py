"""The compose stack for real: images built, Orthanc pushes a chest study, results come back.

deploy/compose.yaml with podman-compose: Orthanc (the PACS) receives a DX study generated
from a Kermany radiograph over REST, forwards it to radflag (Lua OnStableStudy), radflag
classifies it and C-STOREs the SR and the SC back into the same Orthanc study. A second
destination that nothing listens on keeps deliveries pending. The stack is then stopped
(SIGTERM: radflag must exit 0 after draining), removed and started again from its volumes:
the study, its audit trail and the pending deliveries are still there, on PostgreSQL.

Skips without podman/podman-compose (fails under RADFLAG_REQUIRE_CONTAINERS=1).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.stack import (
    BUILD_SCRIPT,
    ComposeStack,
    OrthancRest,
    echo,
    podman_env,
    require_containers,
    run,
    wait_for,
)
from tests.peers.dicomgen import make_study

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.shared]

TEST_CONFIG = """
[listener]
ae_title = "RADFLAG"
allowed_calling_aes = ["ORTHANC"]

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "orthanc"
port = 4242
outputs = ["SR", "SC"]

[[destinations]]          # nothing listens here: its deliveries stay pending
name = "archive"
ae_title = "ARCHIVE"
host = "orthanc"
port = 4299
outputs = ["SR"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(**values: Any) -> None:
    """Print measured figures; also append them to $RADFLAG_CONTAINER_METRICS if set."""
    line = json.dumps(values)
    print(f"container-metrics {line}")
    target = os.environ.get("RADFLAG_CONTAINER_METRICS")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


@pytest.fixture(scope="module")
def images() -> None:
    """Build (or reuse from podman's layer cache) the base, radflag, PostgreSQL and Orthanc."""
    require_containers()
    t0 = time.monotonic()
    run([str(BUILD_SCRIPT)], env=podman_env(), timeout_s=2000)
    sizes = run(
        [
            "podman",
            "images",
            "--filter",
            "reference=localhost/radflag*",
            "--format",
            "{{.Repository}}:{{.Tag}} {{.Size}}",
        ],
        env=podman_env(),
        timeout_s=60,
    )
    _metrics(build_s=round(time.monotonic() - t0, 1), images=sizes.strip().splitlines())


@pytest.fixture
def stack(images: None, tmp_path: Path) -> Iterator[tuple[ComposeStack, dict[str, Any]]]:
    """A fresh compose project on free 127.0.0.1 ports, removed with its volumes after."""
    config = tmp_path / "radflag.toml"
    config.write_text(TEST_CONFIG, encoding="utf-8")
    ports = {k: _free_port() for k in ("dicom", "http", "orthanc_http", "orthanc_dicom")}
    password = secrets.token_hex(12)
    env = {
        "RADFLAG_CONFIG_FILE": str(config),
        "RADFLAG_DICOM_PORT": str(ports["dicom"]),
        "RADFLAG_HTTP_PORT": str(ports["http"]),
        "ORTHANC_HTTP_PORT": str(ports["orthanc_http"]),
        "ORTHANC_DICOM_PORT": str(ports["orthanc_dicom"]),
        "ORTHANC_USER": "radflag",
        "ORTHANC_PASSWORD": password,
        "RADFLAG_DB_PASSWORD": secrets.token_hex(12),
        "ORTHANC_STABLE_AGE_S": "2",
        "RADFLAG_QUIET_PERIOD_S": "3",
    }
    project = f"radflagtest{os.getpid()}"
    s = ComposeStack(project, env)
    s.remove()
    try:
        yield s, {"ports": ports, "password": password}
    finally:
        s.remove()


def _up(s: ComposeStack, info: dict[str, Any]) -> tuple[OrthancRest, float]:
    """Start the stack; return Orthanc's client and seconds to radflag's first C-ECHO."""
    t0 = time.monotonic()
    s.compose("up", "-d")
    wait_for("radflag C-ECHO", lambda: echo(info["ports"]["dicom"], "ORTHANC"), 240)
    echo_s = time.monotonic() - t0
    orthanc = OrthancRest(info["ports"]["orthanc_http"], "radflag", info["password"])
    wait_for("Orthanc REST", orthanc.answers, 60)
    return orthanc, echo_s


def _study_state(s: ComposeStack, uid: str) -> str | None:
    """The study's state in radflag's database (``radflag studies``)."""
    rows = s.radflag("studies")
    return next((str(r["state"]) for r in rows if r["study_instance_uid"] == uid), None)


def _pending(s: ComposeStack, uid: str) -> list[int]:
    """IDs of the study's PENDING outbox entries (``radflag outbox list``)."""
    rows = s.radflag("outbox", "list", "--study", uid, "--state", "PENDING")
    return sorted(int(r["delivery_id"]) for r in rows)


def _audit(s: ComposeStack, uid: str) -> list[tuple[int, str]]:
    """(id, event type) of the study's audit rows, oldest first (``radflag audit``)."""
    rows = s.radflag("audit", "--study", uid)
    return [(int(r["id"]), str(r["event_type"])) for r in rows]


@pytest.mark.timeout(2400)  # a cold image build (no layer cache) takes ~10 min on 2 cores
def test_orthanc_pushes_chest_study_and_gets_results_that_survive_restart(
    stack: tuple[ComposeStack, dict[str, Any]], tmp_path: Path
) -> None:
    s, info = stack
    t_test = time.monotonic()
    orthanc, first_echo_s = _up(s, info)

    study = make_study(1, tmp_path / "study")
    study_id = orthanc.upload(study.paths[0])
    assert orthanc.study_modalities(study_id) == {"DX"}

    # Orthanc forwards (stable after 2 s), radflag classifies and sends SR + SC back into it.
    modalities = wait_for(
        "SR and SC in the Orthanc study",
        lambda: m if {"SR", "OT"} <= (m := orthanc.study_modalities(study_id)) else None,
        300,
        every_s=2,
    )
    assert modalities == {"DX", "SR", "OT"}
    uid = study.study_uid
    pending = wait_for("pending archive deliveries", lambda: _pending(s, uid) or None, 60)
    state = _study_state(s, uid)
    audit = _audit(s, uid)
    assert state == "DELIVERING", state  # the pacs got its results, the archive did not
    assert {"INSTANCE_RECEIVED", "STUDY_CLASSIFIED", "DELIVERY_SENT"} <= {e for _, e in audit}

    # SIGTERM drains and exits 0; the containers go, the volumes stay.
    s.compose("stop")
    exited = json.loads(s.podman("inspect", s.container("radflag")))[0]["State"]
    assert exited["ExitCode"] == 0, s.podman("logs", "--tail", "50", s.container("radflag"))
    s.compose("down")
    _, second_echo_s = _up(s, info)

    assert _study_state(s, uid) == state
    assert _audit(s, uid)[: len(audit)] == audit
    assert _pending(s, uid) == pending
    assert orthanc.study_modalities(study_id) == {"DX", "SR", "OT"}
    _metrics(
        first_echo_s=round(first_echo_s, 1),
        restart_echo_s=round(second_echo_s, 1),
        test_s=round(time.monotonic() - t_test, 1),
    )
