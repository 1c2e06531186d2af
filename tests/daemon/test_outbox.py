"""Outbox delivery: SR + SC to several destinations, back to the sender, SR fallback,
per-destination transfer syntax, dead letters and ``radflag outbox`` retry/drop."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select

from daemon.app import Radflag
from daemon.cli import main as radflag_main
from db.models import Delivery, DeliveryAttempt, Study
from db.queries import audit_trail
from dicom_io.sr import read_sr
from tests.daemon.conftest import dcmsend, make_settings, storage_scp, wait_until
from tests.dicom_io.conftest import free_port, make_dx, save

pytestmark = pytest.mark.dcmtk

SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SR_PLAIN = "1.2.840.10008.5.1.4.1.1.88.33"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _state(app: Radflag, uid: str) -> str | None:
    with app.sessions() as s:
        return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))


def _by_class(received: list[Dataset]) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for ds in received:
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_sr_and_sc_to_pacs_and_back_to_sender(tmp_path: Path, start_app) -> None:
    sender_port, pacs_port = free_port(), free_port()
    classes = [Comprehensive3DSRStorage, SecondaryCaptureImageStorage]
    with (
        storage_scp(pacs_port, classes) as pacs,
        storage_scp(
            sender_port,
            [Comprehensive3DSRStorage, SecondaryCaptureImageStorage],
            ae_title="MODALITY",
        ) as sender,
    ):
        settings = make_settings(
            tmp_path,
            None,
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs_port,
                    "outputs": ["SR", "SC"],
                    "transfer_syntax": "jpeg2000_lossless",
                },
                {"name": "sender", "to_sender": True, "port": sender_port, "outputs": ["SC"]},
            ],
        )
        app = start_app(settings)
        ds = make_dx(seed=21, rows=96, columns=80)
        assert (
            dcmsend(app.port, save(ds, tmp_path / "a.dcm"), calling_ae="MODALITY").returncode == 0
        )
        uid = str(ds.StudyInstanceUID)
        wait_until(lambda: _state(app, uid) == "DONE", what="study DONE")
        at_pacs = _by_class(pacs.wait_for(2))
        assert set(at_pacs) == {SR_3D, SC}
        (sc,) = at_pacs[SC]
        assert sc.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert sc.BurnedInAnnotation == "YES"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert sc.StudyInstanceUID == uid and sc.PatientID == ds.PatientID
        content = read_sr(at_pacs[SR_3D][0])
        assert content.source_sop_instance_uids == [str(ds.SOPInstanceUID)]
        assert content.algorithm_name == "test-pneumonia"
        (back,) = sender.wait_for(1)
        assert back.SOPClassUID == SC and back.SOPInstanceUID == sc.SOPInstanceUID
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert sender.calling_aes == ["RADFLAG"]
    with app.sessions() as s:
        rows = s.scalars(select(Delivery).order_by(Delivery.id)).all()
        assert [(d.destination, d.kind, d.state) for d in rows] == [
            ("pacs", "SR", "SENT"),
            ("pacs", "SC", "SENT"),
            ("sender", "SC", "SENT"),
        ]
        assert rows[2].ae_title == "MODALITY" and rows[2].host == "127.0.0.1"
        study = s.scalars(select(Study)).one()
        assert study.max_probability is not None and study.urgent is not None


def test_pacs_refusing_3d_sr_gets_comprehensive_sr(tmp_path: Path, start_app) -> None:
    port = free_port()
    with storage_scp(port, [ComprehensiveSRStorage]) as old_pacs:
        app = start_app(make_settings(tmp_path, port, destinations=_sr_only(port)))
        ds = make_dx(seed=22)
        assert dcmsend(app.port, save(ds, tmp_path / "a.dcm")).returncode == 0
        uid = str(ds.StudyInstanceUID)
        (sr,) = old_pacs.wait_for(1)
        assert sr.SOPClassUID == SR_PLAIN
        assert read_sr(sr).findings[0].code_value == "233604007"
        wait_until(lambda: _state(app, uid) == "DONE", what="study DONE")
    with app.sessions() as s:
        delivery = s.scalars(select(Delivery)).one()
        assert delivery.sop_instance_uid == sr.SOPInstanceUID
        attempts = s.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)).all()
        assert [a.ok for a in attempts] == [False, True]
        assert "falling back to Comprehensive SR" in (attempts[0].error or "")


def _sr_only(port: int) -> list[dict[str, object]]:
    return [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "outputs": ["SR"]}
    ]


def _config(tmp_path: Path) -> str:
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "radflag.db"}"\n')
    return str(cfg)


def test_dead_letter_then_cli_retry_delivers(
    tmp_path: Path, start_app, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nobody listens yet
    settings = make_settings(
        tmp_path,
        port,
        delivery={"max_attempts": 2, "backoff_base_s": 0.1, "check_interval_s": 0.2},
        destinations=_sr_only(port),
    )
    app = start_app(settings)
    ds = make_dx(seed=23)
    assert dcmsend(app.port, save(ds, tmp_path / "a.dcm")).returncode == 0
    uid = str(ds.StudyInstanceUID)
    wait_until(lambda: _state(app, uid) == "DELIVERY_FAILED", what="DELIVERY_FAILED")
    cfg = _config(tmp_path)
    assert radflag_main(["outbox", "list", "-c", cfg, "--state", "DEAD"]) == 0
    listing = capsys.readouterr().out
    assert "DEAD" in listing and uid[:44] in listing and "last error" in listing
    with storage_scp(port, [Comprehensive3DSRStorage]) as pacs:
        assert radflag_main(["outbox", "retry", "-c", cfg, "--all-dead"]) == 0
        (sr,) = pacs.wait_for(1)
        wait_until(lambda: _state(app, uid) == "DONE", what="DONE after retry")
    with app.sessions() as s:
        attempts = s.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)).all()
        assert [a.ok for a in attempts] == [False, False, True]
    events = [e.event_type for e in audit_trail(app.sessions, uid)]
    assert events.count("DELIVERY_ATTEMPT_FAILED") == 1 and "DELIVERY_DEAD" in events
    assert "DELIVERY_RETRIED" in events and events[-1] == "STUDY_DONE"
    # A sent entry can be neither retried nor dropped.
    with app.sessions() as s:
        sent_id = s.scalars(select(Delivery.id)).one()
    assert radflag_main(["outbox", "drop", "-c", cfg, str(sent_id)]) == 1
    assert "SENT" in capsys.readouterr().err


def test_cli_drop_pending_entry_finishes_study(
    tmp_path: Path, start_app, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    app = start_app(
        make_settings(tmp_path, port, delivery={"backoff_base_s": 60}, destinations=_sr_only(port))
    )
    ds = make_dx(seed=24)
    assert dcmsend(app.port, save(ds, tmp_path / "a.dcm")).returncode == 0
    uid = str(ds.StudyInstanceUID)

    def failed_once() -> bool:
        with app.sessions() as s:
            return s.scalar(select(Delivery.attempts)) == 1

    wait_until(failed_once, what="a failed attempt")
    with app.sessions() as s:
        entry = s.scalars(select(Delivery.id)).one()
    assert radflag_main(["outbox", "drop", "-c", _config(tmp_path), str(entry)]) == 0
    assert f"[{entry}]" in capsys.readouterr().out
    assert _state(app, uid) == "DONE"
    with app.sessions() as s:
        assert s.scalar(select(Delivery.state)) == "CANCELLED"
    assert "DELIVERY_DROPPED" in [e.event_type for e in audit_trail(app.sessions, uid)]
    assert radflag_main(["outbox", "retry", "-c", _config(tmp_path), "999"]) == 1
