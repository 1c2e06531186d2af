"""What the listener refuses is audited: rejected associations and failed C-STOREs."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from db.models import AuditEvent, Instance
from tests.daemon.conftest import make_settings, storescu, wait_until
from tests.dicom_io.conftest import make_dx, save


def _events(app, kind: str) -> list[AuditEvent]:
    with app.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == kind)).all())


def test_unwritable_spool_answers_out_of_resources_and_is_audited(
    tmp_path: Path, start_app
) -> None:
    settings = make_settings(tmp_path, None)
    app = start_app(settings)
    # Replace the spool folder by a plain file: every write must fail (root ignores chmod).
    spool = tmp_path / "spool"
    for child in spool.iterdir():
        child.rmdir() if child.is_dir() else child.unlink()
    spool.rmdir()
    spool.write_text("not a folder")
    ds = make_dx(seed=21)
    out = storescu(app.port, save(ds, tmp_path / "x.dcm"))
    assert "Refused: OutOfResources" in out.stderr
    wait_until(lambda: bool(_events(app, "INSTANCE_REJECTED")), what="audit row")
    (event,) = _events(app, "INSTANCE_REJECTED")
    assert event.sop_instance_uid == ds.SOPInstanceUID
    assert event.actor.startswith("scp:MODALITY@")
    assert "PID-0001" not in str(event.detail)  # no patient ID in the audit detail
    with app.sessions() as s:
        assert s.scalars(select(Instance)).all() == []


def test_unknown_calling_ae_rejected_and_audited(tmp_path: Path, start_app) -> None:
    app = start_app(make_settings(tmp_path, None, listener={"allowed_calling_aes": ["CT01"]}))
    out = storescu(app.port, save(make_dx(seed=22), tmp_path / "y.dcm"), calling_ae="INTRUDER")
    assert out.returncode != 0
    assert "Association Rejected" in out.stderr
    wait_until(lambda: bool(_events(app, "ASSOCIATION_REJECTED")), what="audit row")
    (event,) = _events(app, "ASSOCIATION_REJECTED")
    assert event.actor.startswith("scp:INTRUDER@")
