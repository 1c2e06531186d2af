"""Retention covers result objects, and a purged study re-opened by a late image is reported.

The SR/SC radflag wrote carry the patient's name and burned-in pixels: they go with the
study's retention. A late image that re-opens a purged study would otherwise be classified
alone, as if it were the whole study; radflag fails the study with that reason instead.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from daemon.retention import purge_spool
from db.models import Study, utcnow
from db.queries import audit_trail
from tests.daemon.conftest import dcmsend, make_settings, wait_until
from tests.dicom_io.conftest import make_dx, save


def _study(app, uid: str) -> Study | None:  # type: ignore[no-untyped-def]
    with app.sessions() as s:
        return s.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()


def test_purge_removes_results_and_a_reopened_study_is_not_reclassified(
    tmp_path: Path, start_app, pacs
) -> None:
    app = start_app(make_settings(tmp_path, pacs.port, retention={"enabled": False}))
    first = make_dx(seed=61)
    uid = str(first.StudyInstanceUID)
    assert dcmsend(app.port, save(first, tmp_path / "a.dcm")).returncode == 0
    wait_until(lambda: (st := _study(app, uid)) is not None and st.state == "DONE", what="DONE")
    pacs.wait_for(2)
    results_dir = tmp_path / "results" / uid
    assert len([p for p in results_dir.rglob("*.dcm")]) >= 2
    summary = purge_spool(
        app.sessions,
        tmp_path / "spool",
        app.settings.retention,
        results_root=tmp_path / "results",
        now=utcnow() + timedelta(days=app.settings.retention.spool_max_age_days + 1),
    )
    assert (summary.studies, summary.instances) == (1, 1)
    assert summary.results_removed >= 2 and not results_dir.exists()
    late = make_dx(seed=62, study_uid=uid, PatientID=first.PatientID)
    assert dcmsend(app.port, save(late, tmp_path / "b.dcm")).returncode == 0
    wait_until(lambda: _study(app, uid).state == "FAILED", what="re-opened study FAILED")  # type: ignore[union-attr]
    reason = _study(app, uid).failure_reason or ""  # type: ignore[union-attr]
    assert "retention purged 1 of its 2 images" in reason
    events = [e.event_type for e in audit_trail(app.sessions, uid)]
    assert events.count("STUDY_CLASSIFIED") == 1  # only the original classification
    assert len(pacs.received) == 2  # nothing new was sent
