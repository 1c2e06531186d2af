"""Issue 14, problems 1, 2, 5 and 6 with a real ``radflag serve`` (default pneumonia model),
DCMTK as modality and as PACS, and the admin CLI run from another directory.

No destination at first: the daemon says so (log WARNING, ``/readyz``, dashboard overview)
and ``studies`` shows the study DONE but delivered nowhere. After a destination is added to
the configuration, ``studies resend`` delivers the stored result and ``studies reprocess``
classifies again — both audited.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from daemon.cli import main
from db.engine import make_engine, make_session_factory
from db.models import AuditEvent, Study
from tests.admin.conftest import Serve, base_sections, launch, radflag, wait_for, write_toml
from tests.conftest import shared_path
from tests.peers.dcmtk import StoreSCP, dcmtk_available, storescu
from tests.peers.dicomgen import kermany_images, make_study
from tests.peers.fixtures import netns  # noqa: F401 - fixture
from tests.peers.netns import NetNamespace

pytestmark = [pytest.mark.dcmtk, pytest.mark.shared, pytest.mark.slow]

TOKEN = "admin-flow-token-0123456789"


def _get(ns: NetNamespace, port: int, path: str, token: str | None = None) -> Any:
    def fetch() -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    return ns.call(fetch, timeout_s=20)


def _state(serve: Serve, uid: str) -> str | None:
    engine = make_engine(serve.db_url)
    try:
        with make_session_factory(engine)() as s:
            return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))
    finally:
        engine.dispose()


def _events(serve: Serve, uid: str, event: str) -> list[AuditEvent]:
    engine = make_engine(serve.db_url)
    try:
        with make_session_factory(engine)() as s:
            return list(
                s.scalars(
                    select(AuditEvent).where(
                        AuditEvent.study_instance_uid == uid, AuditEvent.event_type == event
                    )
                ).all()
            )
    finally:
        engine.dispose()


def _row(stdout: str, uid: str) -> list[str]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith(uid))
    return [c.strip() for c in line.split("  ") if c.strip()]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``radflag ARGS`` in this process (the console script's ``main``)."""
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_no_destination_is_said_then_resend_and_reprocess_deliver(
    netns: NetNamespace,  # noqa: F811
    serves: list[Serve],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK not installed")
    kermany = shared_path("cxr", "kermany-pneumonia-train")
    study = make_study(
        1,
        tmp_path / "study",
        images=kermany_images(kermany, 1, label="normal", offset=40),
        patient_id="PID-ADMIN-14",
        accession_number="ACC-ADMIN-14",
    )
    conf = tmp_path / "conf"
    other = tmp_path / "other"
    other.mkdir()
    port, http_port = netns.free_port(), netns.free_port()
    http = {"enabled": True, "host": "127.0.0.1", "port": http_port, "token": TOKEN}
    cfg = write_toml(conf / "radflag.toml", base_sections(port, http=http))
    serve = launch(netns, cfg, port, cwd=other)
    serves.append(serve)

    # 1. Results go nowhere: said in the log, /readyz and the dashboard's overview.
    wait_for(lambda: "no destination configured" in serve.log(), 30, "the start-up warning")
    assert "WARNING" in next(ln for ln in serve.log().splitlines() if "no destination" in ln)
    ready = _get(netns, http_port, "/readyz")
    detail = {c["name"]: c["detail"] for c in ready["checks"]}["destinations"]
    assert "no destination configured" in detail
    overview = _get(netns, http_port, "/api/v1/overview", TOKEN)
    assert any("no destination configured" in w for w in overview["warnings"])
    assert (
        (conf / "data" / "radflag.db").is_file()
        and list(other.iterdir()) == [other / "radflag.log"]
        or not any(p.name == "data" for p in other.iterdir())
    )

    sent = storescu(port, study.paths, ns=netns, called_aet="RADFLAG", calling_aet="MODALITY")
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: _state(serve, study.study_uid) == "DONE", 120, "the study DONE")

    listing = radflag("studies", "-c", str(cfg), cwd=other)
    assert listing.returncode == 0, listing.stderr
    row = _row(listing.stdout, study.study_uid)
    assert row[1] == "ACC-ADMIN-14" and row[3] == "DONE"
    assert row[4] in ("PRESENT Pneumonia", "ABSENT Pneumonia")
    assert row[7] == "no destination"

    # 5. Found by the patient ID the RIS shows (hashed with the configured key, as at ingest).
    # From here the CLI runs in this process (same main(), from the other directory).
    monkeypatch.chdir(other)
    rc, out, _err = cli(capsys, "studies", "find", "--patient-id", "PID-ADMIN-14", "-c", str(cfg))
    assert rc == 0 and study.study_uid in out
    rc, out, _err = cli(capsys, "studies", "find", "--patient-id", "PID-ADMIN-15", "-c", str(cfg))
    assert rc == 1 and study.study_uid not in out

    # 2. A destination is added; resend sends the stored SR (no heatmap was ever made).
    with StoreSCP(tmp_path / "pacs", ns=netns) as pacs:
        dest = [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}]
        cfg2 = write_toml(conf / "with-pacs.toml", base_sections(port, destinations=dest))
        rc, out, err = cli(
            capsys, "studies", "resend", study.study_uid, "--to", pacs.aet, "-c", str(cfg2)
        )
        assert rc == 0, err
        assert "queued 1 result object for pacs" in out
        pacs.wait_for(1, timeout_s=60)
        wait_for(lambda: _state(serve, study.study_uid) == "DONE", 60, "DONE after the resend")
        row = _row(cli(capsys, "studies", "-c", str(cfg2))[1], study.study_uid)
        assert row[7] == "1/1"
        assert [e.actor for e in _events(serve, study.study_uid, "STUDY_RESEND_REQUESTED")] == [
            "cli"
        ]

        # 2. Reprocess classifies again (the daemon's own config has no destination).
        rc, _out, err = cli(capsys, "studies", "reprocess", study.study_uid, "-c", str(cfg2))
        assert rc == 0, err
        wait_for(
            lambda: len(_events(serve, study.study_uid, "STUDY_CLASSIFIED")) == 2,
            120,
            "the second classification",
        )
        wait_for(lambda: _state(serve, study.study_uid) == "DONE", 60, "DONE again")
        assert len(_events(serve, study.study_uid, "STUDY_REPROCESS_REQUESTED")) == 1
