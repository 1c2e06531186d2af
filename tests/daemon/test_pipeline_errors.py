"""Permanent vs transient errors in the worker (issue 9; issue 11 item 3).

An acknowledged instance that can no longer be read fails its study once, quarantined, with
the reason naming the instance -- no retry, no traceback. A transient I/O error is retried.
A messy but usable header gives a result, and the repairs are in the audit trail.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from sqlalchemy import select

import daemon.stages.reading
from db.models import Instance, Study
from db.queries import audit_trail
from tests.daemon.conftest import PacsStandIn, dcmsend, make_settings, wait_until
from tests.dicom_io.conftest import make_dx, save

pytestmark = pytest.mark.dcmtk


def _study(app: Any, uid: str) -> Study | None:
    with app.sessions() as s:
        return s.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()


def _instance(app: Any, sop_uid: str) -> Instance:
    with app.sessions() as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one()


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


def _received(app: Any, tmp_path: Path, **attrs: Any) -> tuple[Any, Path]:
    """Send one DX by DCMTK; return its dataset and spooled path once acknowledged."""
    ds = make_dx(seed=11, **attrs)
    assert dcmsend(app.port, save(ds, tmp_path / "in.dcm")).returncode == 0
    return ds, app.spool.resolve(_instance(app, str(ds.SOPInstanceUID)).path)


def test_spooled_file_that_became_unreadable_fails_once_and_is_quarantined(
    tmp_path: Path, start_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = start_app(make_settings(tmp_path, None, completion={"quiet_period_s": 2.0}))
    ds, path = _received(app, tmp_path)
    path.write_bytes(path.read_bytes()[:200])  # the disk lost most of the file after the ack
    uid = str(ds.StudyInstanceUID)
    wait_until(lambda: (s := _study(app, uid)) is not None and s.state == "FAILED", what="FAILED")
    study = _study(app, uid)
    assert study is not None and study.processing_attempts == 1
    assert f"cannot read the header of {ds.SOPInstanceUID}" in (study.failure_reason or "")
    inst = _instance(app, str(ds.SOPInstanceUID))
    assert inst.quarantined and app.spool.resolve(inst.path).parent == app.spool.quarantine_dir
    events = [e.event_type for e in audit_trail(app.sessions, uid)]
    assert "PROCESSING_RETRY" not in events
    assert events[-2:] == ["INSTANCE_QUARANTINED", "STUDY_FAILED"]
    assert _tracebacks(caplog) == []


def test_vanished_spool_file_fails_once_without_retry(
    tmp_path: Path, start_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = start_app(make_settings(tmp_path, None, completion={"quiet_period_s": 2.0}))
    ds, path = _received(app, tmp_path)
    path.unlink()
    uid = str(ds.StudyInstanceUID)
    wait_until(lambda: (s := _study(app, uid)) is not None and s.state == "FAILED", what="FAILED")
    study = _study(app, uid)
    assert study is not None and study.processing_attempts == 1
    assert "the spooled file is missing" in (study.failure_reason or "")
    assert _tracebacks(caplog) == []


def test_transient_io_error_is_retried(
    tmp_path: Path, pacs: PacsStandIn, start_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = daemon.stages.reading.read_image
    calls: list[Path] = []

    def flaky(path: Path) -> Any:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(daemon.stages.reading, "read_image", flaky)
    app = start_app(make_settings(tmp_path, pacs.port))
    ds, _ = _received(app, tmp_path)
    uid = str(ds.StudyInstanceUID)
    wait_until(lambda: (s := _study(app, uid)) is not None and s.state == "DONE", timeout_s=60)
    events = [e.event_type for e in audit_trail(app.sessions, uid)]
    assert events.count("PROCESSING_RETRY") == 1 and len(calls) == 2


def test_messy_header_gives_a_result_and_audits_the_repairs(
    tmp_path: Path, pacs: PacsStandIn, start_app: Any
) -> None:
    """The header of issue 9's report: hashed birth date, no orientation or imager spacing."""
    ds = make_dx(seed=12)
    for keyword in ("ImagerPixelSpacing", "PatientOrientation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientOrientation = ""
    ds.PixelSpacing = [0, 0]
    ds.WindowWidth = 0  # unusable: ignored, the model's intensity range applies
    raw = b"3b5d5c3712955042212316173ccf37be800003b8e4c5cb8b8b0f6a2c1bd1e1d7"
    ds[0x00100030] = RawDataElement(Tag(0x00100030), "DA", len(raw), raw, 0, False, True)
    app = start_app(make_settings(tmp_path, pacs.port))
    assert dcmsend(app.port, save(ds, tmp_path / "messy.dcm")).returncode == 0
    uid = str(ds.StudyInstanceUID)
    wait_until(lambda: (s := _study(app, uid)) is not None and s.state == "DONE", timeout_s=60)
    (selected,) = [e for e in audit_trail(app.sessions, uid) if e.event_type == "IMAGES_SELECTED"]
    repairs = selected.detail["header_repairs"][str(ds.SOPInstanceUID)]
    assert "PatientBirthDate (DA): emptied (invalid DA)" in repairs
    (ignored,) = selected.detail["grayscale_ignored"][str(ds.SOPInstanceUID)]
    assert "WindowWidth" in ignored
    sr, sc = sorted(pacs.wait_for(2), key=lambda d: str(d.Modality), reverse=True)
    assert sr.Modality == "SR" and sr.PatientBirthDate == ""
    assert sc.Modality == "OT" and sc.PatientBirthDate == ""
