"""radflag in-process: DCMTK storescu sends, the worker classifies, the SR reaches the PACS."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, text

from daemon.app import Radflag
from db.models import Delivery, DeliveryAttempt, Instance, Result, Study
from db.queries import audit_trail
from tests.conftest import shared_path
from tests.daemon.conftest import (
    TRAIL_TWO_IMAGES_SR_AND_SC,
    PacsStandIn,
    dcmsend,
    make_settings,
    storescu,
    wait_until,
)
from tests.dicom_io.conftest import make_dx, save

pytestmark = pytest.mark.dcmtk

SCT_PNEUMONIA = "233604007"


def _content_items(ds: object) -> list[object]:
    items: list[object] = []
    for item in getattr(ds, "ContentSequence", []):
        items.append(item)
        items.extend(_content_items(item))
    return items


def _study_state(app: Radflag, uid: str) -> str | None:
    with app.sessions() as s:
        return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))


def test_study_classified_and_sr_delivered(tmp_path: Path, pacs: PacsStandIn, start_app) -> None:
    chest = shared_path("dicom", "chest-real", "files", "JPEG2KLossless_1s_1f_u_16_16.dcm")
    header = dcmread(chest, stop_before_pixels=True)
    study_uid = str(header.StudyInstanceUID)
    same_patient = {k: header.get(k, "") for k in ("PatientID", "PatientName", "PatientBirthDate")}
    extra = save(
        make_dx(study_uid=study_uid, photometric="MONOCHROME1", seed=3, **same_patient),
        tmp_path / "mono1.dcm",
    )
    app = start_app(make_settings(tmp_path, pacs.port))
    sent = dcmsend(app.port, chest, extra)
    assert sent.returncode == 0, sent.stderr

    received = {str(ds.SOPClassUID): ds for ds in pacs.wait_for(2)}
    sr = received["1.2.840.10008.5.1.4.1.1.88.34"]  # Comprehensive 3D SR
    sc = received["1.2.840.10008.5.1.4.1.1.7"]  # Secondary Capture (heatmap)
    assert sc.StudyInstanceUID == study_uid and sc.BurnedInAnnotation == "YES"
    assert sc.SeriesInstanceUID not in {sr.SeriesInstanceUID, header.SeriesInstanceUID}
    assert sr.StudyInstanceUID == study_uid
    assert sr.PatientID == dcmread(chest, stop_before_pixels=True).PatientID
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert pacs.calling_aes == ["RADFLAG", "RADFLAG"]
    codes = {
        item.ConceptCodeSequence[0].CodeValue
        for item in _content_items(sr)
        if item.ValueType == "CODE"
    }
    assert SCT_PNEUMONIA in codes
    nums = [
        i
        for i in _content_items(sr)
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeMeaning == "Probability"
    ]
    probability = float(nums[0].MeasuredValueSequence[0].NumericValue)
    assert 0.0 <= probability <= 1.0

    wait_until(lambda: _study_state(app, study_uid) == "DONE", what="study DONE")
    with app.sessions() as s:
        result = s.scalars(select(Result)).one()
        assert result.model_name == "test-pneumonia"
        assert len(result.weights_sha256) == 64
        assert result.n_images == 2
        assert result.probability == pytest.approx(probability, abs=1e-4)
        assert result.probability == pytest.approx(max(result.images.values()))
        assert result.sr_sop_instance_uid == sr.SOPInstanceUID
        assert result.device == "cpu"
        assert {"decode", "inference", "sr", "total"} <= set(result.timings_ms)
        for inst in s.scalars(select(Instance)).all():
            assert not Path(inst.path).is_absolute()  # relative to the spool root
            assert app.spool.resolve(inst.path).is_file()
    events = [e.event_type for e in audit_trail(app.sessions, study_uid)]
    assert events == TRAIL_TWO_IMAGES_SR_AND_SC


def test_undecodable_pixels_quarantined_and_study_failed(
    tmp_path: Path, pacs: PacsStandIn, start_app
) -> None:
    bad = shared_path("dicom", "chest-real", "files", "966_malformed.dcm")
    study_uid = str(dcmread(bad, stop_before_pixels=True).StudyInstanceUID)
    app = start_app(make_settings(tmp_path, pacs.port))
    assert dcmsend(app.port, bad).returncode == 0
    wait_until(lambda: _study_state(app, study_uid) == "FAILED", what="study FAILED")
    with app.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert "cannot decode pixel data" in (study.failure_reason or "")
        inst = s.scalars(select(Instance)).one()
        assert inst.quarantined
        assert app.spool.resolve(inst.path).parent == tmp_path / "spool" / "quarantine"
        assert app.spool.resolve(inst.path).is_file()
        assert s.scalars(select(Delivery)).all() == []
    events = [e.event_type for e in audit_trail(app.sessions, study_uid)]
    assert events[-2:] == ["INSTANCE_QUARANTINED", "STUDY_FAILED"]
    assert pacs.received == []
    # The listener keeps serving.
    good = save(make_dx(seed=5), tmp_path / "good.dcm")
    assert dcmsend(app.port, good).returncode == 0
    pacs.wait_for(1)


def test_lateral_only_study_is_not_applicable(tmp_path: Path, pacs: PacsStandIn, start_app) -> None:
    lateral = make_dx(ViewPosition="LL", seed=7)
    path = save(lateral, tmp_path / "lat.dcm")
    app = start_app(make_settings(tmp_path, pacs.port))
    assert dcmsend(app.port, path).returncode == 0
    uid = str(lateral.StudyInstanceUID)
    wait_until(lambda: _study_state(app, uid) == "NOT_APPLICABLE", what="NOT_APPLICABLE")
    trail = audit_trail(app.sessions, uid)
    assert trail[-1].event_type == "STUDY_NOT_APPLICABLE"
    reasons = trail[-1].detail["reasons"]["test-pneumonia"]["excluded"]
    assert str(lateral.SOPInstanceUID) in reasons
    assert pacs.received == []


def test_database_failure_answers_out_of_resources(tmp_path: Path, start_app) -> None:
    app = start_app(make_settings(tmp_path, None))
    with app.engine.begin() as conn:
        conn.execute(text("DROP TABLE instances"))
    ds = make_dx(seed=9)
    out = storescu(app.port, save(ds, tmp_path / "x.dcm"))
    assert "Refused: OutOfResources" in out.stderr  # 0xA700, PS3.4 Annex B.2.3
    leftovers = [p for p in (tmp_path / "spool").rglob("*.dcm")]
    assert leftovers == []


def test_restart_resumes_receiving_studies_and_pending_sends(
    tmp_path: Path, pacs: PacsStandIn, tiny_models
) -> None:
    # First run: the PACS is down (wrong port), a study arrives and gets classified.
    down = make_settings(
        tmp_path, pacs_port=1, delivery={"backoff_base_s": 0.2, "check_interval_s": 0.2}
    )
    app = Radflag(down, models=tiny_models)
    app.start()
    ds = make_dx(seed=11)
    assert dcmsend(app.port, save(ds, tmp_path / "a.dcm")).returncode == 0
    uid = str(ds.StudyInstanceUID)
    wait_until(lambda: _study_state(app, uid) == "DELIVERING", what="DELIVERING")

    def _attempts() -> int:
        with app.sessions() as s:
            return len(s.scalars(select(DeliveryAttempt)).all())

    wait_until(lambda: _attempts() >= 1, what="a failed attempt")
    app.stop()
    # Second run: same database and spool, PACS reachable: the pending SR goes out.
    up = make_settings(tmp_path, pacs.port)
    with app.sessions() as s:  # the destination is part of the outbox row: repoint it
        s.execute(text("UPDATE deliveries SET port = :p"), {"p": pacs.port})
        s.commit()
    app2 = Radflag(up, models=tiny_models)
    app2.start()
    try:
        received = pacs.wait_for(2)
        assert {ds.Modality for ds in received} == {"SR", "OT"}
        assert {ds.StudyInstanceUID for ds in received} == {uid}
        wait_until(lambda: _study_state(app2, uid) == "DONE", what="DONE after restart")
        with app2.sessions() as s:
            attempts = s.scalars(select(DeliveryAttempt)).all()
            assert [a.ok for a in attempts][-1] is True
            assert any(not a.ok for a in attempts)
    finally:
        app2.stop()
    events = [e.event_type for e in audit_trail(app2.sessions, uid)]
    assert "DELIVERY_ATTEMPT_FAILED" in events and events[-1] == "STUDY_DONE"


def test_graceful_stop_keeps_receiving_study_for_next_start(
    tmp_path: Path, pacs: PacsStandIn, tiny_models
) -> None:
    slow = make_settings(tmp_path, pacs.port, completion={"quiet_period_s": 3600})
    app = Radflag(slow, models=tiny_models)
    app.start()
    ds = make_dx(seed=13)
    assert dcmsend(app.port, save(ds, tmp_path / "b.dcm")).returncode == 0
    app.stop()
    assert _study_state(app, str(ds.StudyInstanceUID)) == "RECEIVING"
    app2 = Radflag(make_settings(tmp_path, pacs.port), models=tiny_models)
    app2.start()
    try:
        pacs.wait_for(1)
    finally:
        app2.stop()
    shutil.rmtree(tmp_path / "spool", ignore_errors=True)
