"""The dashboard in headless Chromium against an in-process radflag on 127.0.0.1.

Chromium runs without a driver: ``--dump-dom`` gives the page after its scripts ran (the
virtual time budget lets the API requests finish), ``--screenshot`` writes
``artifacts/dashboard.png`` at the repository root for a human to look at.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from daemon.app import Radflag
from daemon.settings import Settings
from db.models import Study
from tests.conftest import REPO_ROOT
from tests.daemon import conftest as daemon_fixtures
from tests.daemon.conftest import PacsStandIn, make_settings, storescu, wait_until
from tests.dicom_io.conftest import make_dx, save

pytestmark = pytest.mark.dcmtk

# The in-process radflag and the PACS stand-in of the daemon tests.
pacs = daemon_fixtures.pacs
start_app = daemon_fixtures.start_app
tiny_models = daemon_fixtures.tiny_models
tiny_bundle = daemon_fixtures.tiny_bundle

TOKEN = "dashboard-token-0123456789"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FINAL_STATES = {"DONE", "FAILED", "NOT_APPLICABLE", "DELIVERY_FAILED"}


class _Tables(HTMLParser):
    """Collect the text of every body row of every ``<table id=...>``, and ``<body>`` attrs."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.body: dict[str, str | None] = {}
        self.hidden_ids: set[str] = set()
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "hidden" in a and a.get("id"):
            self.hidden_ids.add(str(a["id"]))
        if tag == "body":
            self.body = a
        elif tag == "table":
            self._table = a.get("id")
            self.rows.setdefault(self._table or "", [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.rows[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        pytest.skip("Debian chromium not installed")
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
        "--virtual-time-budget=8000",
        *args,
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def page(tmp_path: Path, url: str) -> _Tables:
    parsed = _Tables()
    parsed.feed(chromium(tmp_path, url, "--dump-dom").stdout)
    return parsed


def api(app: Radflag, path: str) -> Any:
    assert app.http is not None
    req = urllib.request.Request(f"http://127.0.0.1:{app.http.port}/api/v1{path}")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_dashboard_in_headless_chromium(
    tmp_path: Path, pacs: PacsStandIn, start_app: Callable[[Settings], Radflag]
) -> None:
    settings = make_settings(tmp_path, pacs.port, http={"enabled": True, "port": 0, "token": TOKEN})
    app = start_app(settings)
    assert app.http is not None
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = [save(make_dx(seed=i), inputs / f"dx{i}.dcm") for i in range(3)]
    # Pixel data cut short: radflag stores it, the decoder refuses it -> FAILED.
    broken = make_dx(seed=9)
    broken.PixelData = broken.PixelData[:100]
    files.append(save(broken, inputs / "broken.dcm"))
    files.append(save(make_dx(seed=5, modality="CT"), inputs / "ct.dcm"))  # NOT_APPLICABLE
    for f in files:
        sent = storescu(app.port, f)
        assert sent.returncode == 0, sent.stderr

    def states() -> set[str]:
        with app.sessions() as s:
            return set(s.scalars(select(Study.state)).all())

    wait_until(lambda: states() <= FINAL_STATES and len(states()) > 0, what="studies settled")
    studies = api(app, "/studies")
    assert len(studies) == len(files)
    by_state = {s["state"] for s in studies}
    assert {"DONE", "FAILED", "NOT_APPLICABLE"} <= by_state
    failed_uid = str(broken.StudyInstanceUID)

    base = f"http://127.0.0.1:{app.http.port}/dashboard/"
    screenshot = REPO_ROOT / "artifacts" / "dashboard.png"
    screenshot.parent.mkdir(exist_ok=True)
    screenshot.unlink(missing_ok=True)
    chromium(tmp_path, f"{base}#token={TOKEN}", f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    dom = page(tmp_path, f"{base}#token={TOKEN}")
    assert dom.body.get("data-state") == "loaded"
    assert "content" not in dom.hidden_ids and "login" in dom.hidden_ids
    rows = dom.rows["studies"]
    assert rows[0][:8] == [
        "Study Instance UID",
        "Accession",
        "Study date",
        "State",
        "Finding",
        "Probability",
        "Threshold",
        "Delivered",
    ]
    shown = {r[0]: r for r in rows[1:]}  # full UIDs, pasteable into `radflag studies show`
    assert set(shown) == {s["study_instance_uid"] for s in studies}
    for s in studies:
        row = shown[s["study_instance_uid"]]
        assert row[1:4] == ["ACC1", "2024-01-01", s["state"]]
        expected = {True: "PRESENT", False: "ABSENT", None: "–"}[s["positive"]]
        assert row[4].split()[0] == expected
        if s["probability"] is not None:
            assert f"{s['probability']:.3f}" in row[5]
            assert row[6] == f"{s['threshold']:.2f}"
        if s["state"] == "DONE":
            assert row[7] == "2/2"  # SR + SC to the one destination
        if s["state"] == "NOT_APPLICABLE":
            assert "modality_not_supported" in row[8]
        assert f"radflag studies show {s['study_instance_uid']}" in row[-1]
    failures = dom.rows["failures"][1:]
    assert [r[0] for r in failures] == [failed_uid]
    assert "decode" in failures[0][3].lower()
    assert dom.rows["dead-letters"][1:] == [["no dead letter"]]
    (model_row,) = dom.rows["models"][1:]
    assert model_row[:2] == ["test-pneumonia", "0.0.1-test"]
    assert model_row[3] == "loaded"
    latency = {r[0]: r for r in dom.rows["latency"][1:]}
    assert latency["ready to classified"][1] == str(
        sum(1 for s in studies if s["state"] in ("DONE", "DELIVERY_FAILED"))
    )


def test_dashboard_asks_for_a_token_and_refuses_a_wrong_one(
    tmp_path: Path, start_app: Callable[[Settings], Radflag]
) -> None:
    app = start_app(
        make_settings(tmp_path, None, http={"enabled": True, "port": 0, "token": TOKEN})
    )
    assert app.http is not None
    base = f"http://127.0.0.1:{app.http.port}/dashboard/"

    fresh = page(tmp_path, base)
    assert fresh.body.get("data-state") == "need-token"
    assert "login" not in fresh.hidden_ids and "content" in fresh.hidden_ids

    wrong = chromium(tmp_path, f"{base}#token=not-the-token-0123456789", "--dump-dom").stdout
    assert 'data-state="need-token"' in wrong
    assert "That token was refused." in wrong
