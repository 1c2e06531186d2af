"""Retention: old pixel data of finished studies is purged, audited, and nothing else goes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.retention import OutsideSpool, SpoolFileRemover, purge_spool
from daemon.settings import RetentionSettings
from db.ingest import NewInstance, PatientIdPolicy, record_instance
from db.models import AuditEvent, Instance, Result, Study, utcnow
from db.queries import audit_trail
from tests.db.conftest import ResultSpec, add_study, detail_of

SETTINGS = RetentionSettings(spool_max_age_days=30)


def _spool_file(spool: Path, uid: str, n: int = 1, size: int = 100) -> str:
    path = spool / uid / f"{uid}.0" / f"{uid}.{n}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return str(path)


def test_purges_only_old_finished_studies(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    old = utcnow() - timedelta(days=40)
    young = utcnow() - timedelta(days=5)
    cases = {
        # uid: (state, received, expect purged)
        "5.1": ("DONE", old, True),
        "5.2": ("NOT_APPLICABLE", old, True),
        "5.3": ("FAILED", old, True),
        "5.4": ("DELIVERY_FAILED", old, False),  # an operator may still retry the delivery
        "5.5": ("DELIVERING", old, False),
        "5.6": ("RECEIVING", old, False),
        "5.7": ("DONE", young, False),
    }
    for uid, (state, received, _) in cases.items():
        add_study(
            sessions,
            uid,
            state=state,
            received_at=received,
            quiet_s=30,
            classify_s=1 if state != "RECEIVING" else None,
            deliver_s=1 if state == "DONE" else None,
            results=(ResultSpec(),) if state in ("DONE", "DELIVERING", "DELIVERY_FAILED") else (),
            instance_paths=(_spool_file(spool, uid, 1, 100), _spool_file(spool, uid, 2, 200)),
        )
    summary = purge_spool(sessions, spool, SETTINGS)
    assert (summary.studies, summary.instances, summary.failed) == (3, 6, 0)
    assert summary.bytes_freed == 3 * (100 + 200)
    with sessions() as s:
        for uid, (_, _, purged) in cases.items():
            insts = s.scalars(
                select(Instance).join(Study).where(Study.study_instance_uid == uid)
            ).all()
            assert len(insts) == 2  # rows stay
            for inst in insts:
                assert (inst.purged_at is not None) is purged, uid
                assert Path(inst.path).exists() is not purged, uid
            assert (spool / uid).exists() is not purged  # emptied folders are removed
        assert len(s.scalars(select(Result)).all()) == 4  # results stay
    trail = audit_trail(sessions, "5.1")
    assert trail[-1].event_type == "INSTANCES_PURGED" and trail[-1].actor == "retention"
    detail = detail_of(trail, "INSTANCES_PURGED")
    assert detail["sop_instance_uids"] == ["5.1.1", "5.1.2"]
    assert detail["bytes_freed"] == 300 and detail["study_state"] == "DONE"
    assert [e.event_type for e in trail][:1] == ["INSTANCE_RECEIVED"]  # history intact
    # A second run has nothing left to do and audits nothing.
    assert purge_spool(sessions, spool, SETTINGS).studies == 0
    with sessions() as s:
        purges = s.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "INSTANCES_PURGED")
        ).all()
        assert len(purges) == 3


def test_missing_file_and_path_outside_spool(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"keep me")
    old = utcnow() - timedelta(days=40)
    add_study(
        sessions,
        "6.1",
        state="DONE",
        received_at=old,
        quiet_s=1,
        classify_s=1,
        deliver_s=1,
        instance_paths=(str(spool / "gone.dcm"), str(outside), _spool_file(spool, "6.1", 3)),
    )
    summary = purge_spool(sessions, spool, SETTINGS)
    assert (summary.instances, summary.missing, summary.failed) == (2, 1, 1)
    assert outside.read_bytes() == b"keep me"
    detail = detail_of(audit_trail(sessions, "6.1"), "INSTANCES_PURGED")
    assert detail["missing"] == ["6.1.1"]
    assert list(detail["failed"]) == ["6.1.2"] and "outside the spool" in detail["failed"]["6.1.2"]
    with sessions() as s:
        kept = s.scalars(select(Instance).where(Instance.sop_instance_uid == "6.1.2")).one()
        assert kept.purged_at is None  # not ours: left unpurged, reported every run


def test_late_instance_reopens_study_and_blocks_purge(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    path = _spool_file(spool, "7.1")
    add_study(
        sessions,
        "7.1",
        state="DONE",
        received_at=utcnow() - timedelta(days=40),
        quiet_s=1,
        classify_s=1,
        deliver_s=1,
        instance_paths=(path,),
    )
    late = NewInstance(
        sop_instance_uid="7.1.9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid="7.1",
        series_instance_uid="7.1.0",
        modality="DX",
        patient_id=None,
        calling_ae="MODALITY",
        peer_host="127.0.0.1",
        path=_spool_file(spool, "7.1", 9),
        size_bytes=100,
        transfer_syntax_uid=None,
    )
    record_instance(sessions, late, PatientIdPolicy(key=b"k"))
    assert purge_spool(sessions, spool, SETTINGS).studies == 0
    assert Path(path).exists()


def test_remover_refuses_the_spool_root_and_prunes_up_to_it(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    remover = SpoolFileRemover(spool)
    f = Path(_spool_file(spool, "8.1"))
    sibling = Path(_spool_file(spool, "8.2"))
    assert remover(str(f)) is True
    assert not (spool / "8.1").exists() and spool.is_dir() and sibling.exists()
    assert remover(str(f)) is False
    with pytest.raises(OutsideSpool):
        remover(str(spool))
    with pytest.raises(OutsideSpool):
        remover(str(spool / ".." / "x.dcm"))
