"""A duplicate never replaces the acknowledged original (issue 12: refused duplicate bug).

Before the fix, the listener wrote every copy over the final name with ``os.replace``: a copy
with the same UIDs but other pixels, refused with 0xA700 because the database was down, left
its bytes in the spool in place of the acknowledged original.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from daemon.sink import DatabaseSink
from db.audit import AuditEventType
from db.engine import make_engine, make_session_factory
from db.ingest import PatientIdPolicy
from db.models import AuditEvent, Instance
from db.schema import ensure_schema
from dicom_io.scp import Listener, ListenerConfig
from dicom_io.spool import Spool
from tests.dicom_io.conftest import SCP_AE, make_dx, save, start_listener
from tests.dicom_io.test_scp import storescu

pytestmark = pytest.mark.dcmtk


def _mutated_copy(source: Path, out: Path) -> Path:
    """Same UIDs, other pixel bytes (one flipped byte in the middle of Pixel Data)."""
    ds = dcmread(source)
    pixels = bytearray(ds.PixelData)
    pixels[len(pixels) // 2] ^= 0xFF
    ds.PixelData = bytes(pixels)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_refused_duplicate_never_replaces_the_original(tmp_path: Path) -> None:
    running = start_listener(tmp_path)
    try:
        ds = make_dx()
        original = save(ds, tmp_path / "original.dcm")
        changed = _mutated_copy(original, tmp_path / "changed.dcm")
        assert storescu(running.port, original).returncode == 0
        spooled = running.spool.path_for(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        acknowledged = spooled.read_bytes()

        running.sink.fail = True  # the database goes down
        refused = storescu(running.port, changed, options=("-v",))

        assert refused.returncode != 0
        assert "outofresources" in (refused.stdout + refused.stderr).lower()  # 0xA700
        assert spooled.read_bytes() == acknowledged
        assert not list(running.spool.duplicates_dir.glob("*.dcm"))  # refused copy not kept
        assert not list(running.spool.root.rglob("*.tmp"))
    finally:
        running.listener.stop(grace_s=2)


def test_duplicate_with_other_bytes_is_kept_aside_and_audited(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'radflag.db'}")
    ensure_schema(engine)
    sessions = make_session_factory(engine)
    spool = Spool(tmp_path / "spool")
    sink = DatabaseSink(sessions, PatientIdPolicy(key=b"k"), spool.root)
    config = ListenerConfig(
        ae_title=SCP_AE,
        host="127.0.0.1",
        port=0,
        acse_timeout_s=10,
        dimse_timeout_s=20,
        network_timeout_s=20,
    )
    listener = Listener(config, spool, sink)
    listener.start()
    try:
        ds = make_dx()
        original = save(ds, tmp_path / "original.dcm")
        changed = _mutated_copy(original, tmp_path / "changed.dcm")
        for f in (original, original, changed):
            assert storescu(listener.port, f).returncode == 0
        spooled = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert dcmread(spooled).PixelData == dcmread(original).PixelData
        [aside] = spool.duplicates_dir.glob("*.dcm")
        assert dcmread(aside).PixelData == dcmread(changed).PixelData
        with sessions() as session:
            [row] = session.scalars(select(Instance)).all()
            events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert row.path == spooled.relative_to(spool.root).as_posix()  # relative to the root
        assert row.duplicate_count == 2
        kinds = [e.event_type for e in events]
        assert kinds.count(AuditEventType.INSTANCE_DUPLICATE.value) == 1
        [kept] = [e for e in events if e.event_type == "INSTANCE_DUPLICATE_KEPT_ASIDE"]
        assert kept.detail["kept_aside"] == aside.relative_to(spool.root).as_posix()
        assert kept.detail["original"] == row.path
    finally:
        listener.stop(grace_s=2)
        engine.dispose()
