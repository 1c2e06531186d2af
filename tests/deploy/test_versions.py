"""Validated versions: the lock file, the bundle cards and the start-up warning of serve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.versions import (
    MODEL_PACKAGES,
    VALIDATED_KEY,
    running_versions,
    validated_versions,
    version_drift,
)
from model.bundle import default_bundle_path, read_card
from tests.conftest import REPO_ROOT

RADFLAG = Path(sys.executable).with_name("radflag")
BUNDLES = REPO_ROOT / "model" / "bundles"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


@pytest.mark.parametrize("bundle", sorted(p.name for p in BUNDLES.iterdir() if p.is_dir()))
def test_every_bundle_card_records_the_locked_versions_of_every_model_package(bundle: str) -> None:
    validated = read_card(BUNDLES / bundle).training[VALIDATED_KEY]
    assert set(validated) == set(MODEL_PACKAGES)
    pins = _constraints()
    assert {p: pins[p] for p in validated} == validated


def test_the_environment_matches_the_lock_file() -> None:
    # CI installs with -c constraints.txt; a drifted environment must fail here, not later.
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "freeze_constraints.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_drift_names_each_changed_package_and_ignores_build_labels() -> None:
    validated = validated_versions(read_card(default_bundle_path()).training)
    running = dict(validated)
    assert version_drift(validated, running) == []
    running["torch"] = validated["torch"] + "+cpu"  # a CPU wheel of the same release
    assert version_drift(validated, running) == []
    running["timm"] = "0.9.16"
    del running["monai"]
    drift = {d.package: (d.validated, d.running) for d in version_drift(validated, running)}
    assert drift == {"timm": (validated["timm"], "0.9.16"), "monai": (validated["monai"], None)}


def test_old_cards_fall_back_to_their_software_record() -> None:
    training = {"software": {"python": "3.11.7", "torch": "2.14.1+cu130", "timm": "1.0.31"}}
    assert validated_versions(training) == {"torch": "2.14.1+cu130", "timm": "1.0.31"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_warns_at_start_up_for_each_package_the_card_was_not_validated_with(
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), bundle)
    card_path = bundle / "model.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["training"][VALIDATED_KEY]["monai"] = "1.3.0"
    card_path.write_text(json.dumps(card), encoding="utf-8")
    config = tmp_path / "radflag.toml"
    config.write_text(
        f'[listener]\nhost = "127.0.0.1"\nport = {_free_port()}\n'
        f'[storage]\nspool_dir = "{tmp_path}/spool"\nresults_dir = "{tmp_path}/results"\n'
        f'[database]\nurl = "sqlite:///{tmp_path}/radflag.db"\n'
        f'[models]\nbundles = ["{bundle}"]\n',
        encoding="utf-8",
    )
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADFLAG_")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(RADFLAG), "serve", "--config", str(config)], stderr=log, stdout=log, env=env
        )
    try:  # the warnings come before "radflag started" (listener up)
        deadline = time.monotonic() + 120
        while '"radflag started"' not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    warnings = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if line.startswith("{") and '"package"' in line
    ]
    assert [(w["package"], w["validated_version"]) for w in warnings] == [("monai", "1.3.0")]
    assert warnings[0]["running_version"] == running_versions(["monai"])["monai"]
    assert warnings[0]["level"].upper().startswith("WARN")
