"""The dashboard (headless Chromium) of a radflag with no destination: the warning is on the
page, the study row says its results went nowhere, and the actions are shown read-only.

The screenshot ``artifacts/dashboard-no-destination.png`` is for a human to look at.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.app import Radflag
from daemon.settings import Settings
from db.models import Study
from tests.conftest import REPO_ROOT
from tests.daemon import conftest as daemon_fixtures
from tests.daemon.conftest import make_settings, storescu, wait_until
from tests.dicom_io.conftest import make_dx, save
from tests.e2e.test_dashboard_chromium import TOKEN, _Tables, chromium

pytestmark = pytest.mark.dcmtk

start_app = daemon_fixtures.start_app
tiny_models = daemon_fixtures.tiny_models
tiny_bundle = daemon_fixtures.tiny_bundle


def test_dashboard_says_results_go_nowhere(
    tmp_path: Path, start_app: Callable[[Settings], Radflag]
) -> None:
    app = start_app(
        make_settings(tmp_path, None, http={"enabled": True, "port": 0, "token": TOKEN})
    )
    assert app.http is not None
    ds = make_dx(seed=21)
    assert storescu(app.port, save(ds, tmp_path / "dx.dcm")).returncode == 0
    uid = str(ds.StudyInstanceUID)

    def state() -> str | None:
        with app.sessions() as s:
            return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))

    wait_until(lambda: state() == "DONE", what="DONE")
    wait_until(lambda: bool(app.warnings), what="the start-up warning")

    url = f"http://127.0.0.1:{app.http.port}/dashboard/#token={TOKEN}"
    shot = REPO_ROOT / "artifacts" / "dashboard-no-destination.png"
    shot.parent.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    chromium(tmp_path, url, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    html = chromium(tmp_path, url, "--dump-dom").stdout
    dom = _Tables()
    dom.feed(html)
    assert dom.body.get("data-state") == "loaded"
    assert "warnings" not in dom.hidden_ids
    assert "no destination configured: results are stored but sent nowhere" in html
    (row,) = dom.rows["studies"][1:]
    assert row[0] == uid and row[3] == "DONE" and row[7] == "no destination"
    assert row[4].split()[0] in ("PRESENT", "ABSENT")
    assert f"radflag studies resend {uid}" in row[-1]
    assert f"radflag studies reprocess {uid}" in row[-1]
