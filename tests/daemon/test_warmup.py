"""The SR encoder is warm before the first study: highdicom's tables are read at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import daemon.app
from tests.daemon.conftest import make_settings

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
from highdicom._standard_utils import get_module_attribute_map as tables
from daemon.warmup import warm_up_sr_encoder
before = tables.cache_info().currsize
seconds = warm_up_sr_encoder()
print(before, tables.cache_info().currsize, seconds is not None)
"""


def test_warm_up_reads_highdicom_tables_in_a_fresh_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "True"]


def test_worker_process_warms_up_at_start(
    tmp_path: Path, start_app, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(daemon.app, "warm_up_sr_encoder", lambda: calls.append(1) or 0.0)
    start_app(make_settings(tmp_path, None))
    assert calls == [1]
