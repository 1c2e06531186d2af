"""A crash's leftover temporary files leave the spools; a write in progress stays."""

from __future__ import annotations

import os
import time
from pathlib import Path

from daemon.app import TEMP_FILE_MAX_AGE_S
from dicom_io.spool import TEMP_SUFFIX
from tests.daemon.conftest import make_settings


def _temp(folder: Path, name: str, age_s: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.0123456789ab{TEMP_SUFFIX}"
    path.write_bytes(b"partial C-STORE")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_start_sweeps_stale_temp_files_of_both_spools(tmp_path: Path, start_app) -> None:  # type: ignore[no-untyped-def]
    stale = _temp(tmp_path / "spool" / "1.2.3", "1.2.3.4.dcm", TEMP_FILE_MAX_AGE_S + 60)
    stale_result = _temp(tmp_path / "results" / "1.2.3", "sr.dcm", TEMP_FILE_MAX_AGE_S + 60)
    fresh = _temp(tmp_path / "spool" / "1.2.3", "1.2.3.5.dcm", 5)
    start_app(make_settings(tmp_path, None))
    deadline = time.monotonic() + 20
    while (stale.exists() or stale_result.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the sweep is a scheduler job started at once
    assert not stale.exists() and not stale_result.exists()
    assert fresh.exists()
