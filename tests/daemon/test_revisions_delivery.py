"""A re-processed study reaches a DCMTK ``storescp`` as a new revision plus an IOCM rejection note.

radflag (in-process, tiny real model) classifies a one-image study and delivers SR + SC to
``storescp`` (configured ``supersede = "iocm_reject"``); a late image re-opens the study. The
PACS then holds five distinct objects: both SRs (the newer naming the older in its
Predecessor Documents Sequence), both SCs, and a Key Object Selection Document titled
"Rejected for Quality Reasons" that references the superseded SR and SC and passes dciodvfy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from highdicom.sr import Comprehensive3DSR
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from db.models import Result, Study
from db.queries import audit_trail
from dicom_io.kos import KOS_SOP_CLASS, rejected_instances
from dicom_io.revisions import predecessor_of
from tests.daemon.conftest import dcmsend, make_settings, wait_until
from tests.dicom_io.conftest import free_port, make_dx, require_tool, save
from tests.peers.dcmtk import STORESCP, dcmtk_available

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _received(out_dir: Path) -> list[Dataset]:
    return [dcmread(p) for p in sorted(out_dir.iterdir()) if p.is_file()]


def _done_count(app, uid: str) -> int:  # type: ignore[no-untyped-def]
    return [e.event_type for e in audit_trail(app.sessions, uid)].count("STUDY_DONE")


def test_late_image_gives_a_new_revision_and_a_rejection_note(tmp_path: Path, start_app) -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK not installed")
    port, out_dir = free_port(), tmp_path / "pacs"
    out_dir.mkdir()
    scp = subprocess.Popen(
        [str(STORESCP), "--promiscuous", "+xa", "--unique-filenames", "-od", str(out_dir)]
        + ["-aet", "PACS", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        settings = make_settings(
            tmp_path,
            None,
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": port,
                    "supersede": "iocm_reject",
                }
            ],
        )
        app = start_app(settings)
        first = make_dx(seed=51)
        uid = str(first.StudyInstanceUID)
        assert dcmsend(app.port, save(first, tmp_path / "a.dcm")).returncode == 0
        wait_until(lambda: _done_count(app, uid) == 1, what="first result delivered")
        late = make_dx(seed=52, study_uid=uid, PatientID=first.PatientID)
        assert dcmsend(app.port, save(late, tmp_path / "b.dcm")).returncode == 0
        wait_until(lambda: _done_count(app, uid) == 2, what="revision delivered")
        wait_until(lambda: len(_received(out_dir)) >= 5, timeout_s=10, what="5 objects")
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    received = _received(out_dir)
    assert len(received) == 5  # one C-STORE each (unique file names: duplicates would show)
    assert len({str(ds.SOPInstanceUID) for ds in received}) == 5
    by_class: dict[str, list[Dataset]] = {}
    for ds in received:
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
    srs = sorted(by_class[SR_3D], key=lambda ds: int(ds.InstanceNumber))
    scs = sorted(by_class[SC], key=lambda ds: int(ds.InstanceNumber))
    (kos,) = by_class[KOS_SOP_CLASS]
    assert [len(ds.ContentSequence) > 0 for ds in srs] == [True, True]
    assert "PredecessorDocumentsSequence" not in srs[0]
    (pred,) = predecessor_of(srs[1])
    assert pred.sop_instance_uid == srs[0].SOPInstanceUID
    assert srs[0].SeriesInstanceUID == srs[1].SeriesInstanceUID
    assert sorted(rejected_instances(kos)) == sorted(
        [str(srs[0].SOPInstanceUID), str(scs[0].SOPInstanceUID)]
    )
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
    assert kos.StudyInstanceUID == uid and kos.PatientID == first.PatientID
    kos_path = next(p for p in out_dir.iterdir() if dcmread(p).SOPClassUID == KOS_SOP_CLASS)
    proc = subprocess.run(
        [require_tool("dciodvfy"), str(kos_path)], capture_output=True, text=True, timeout=60
    )
    assert [
        line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")
    ] == []
    # highdicom reads the newer SR; its Contributing Equipment names the algorithm.
    document = Comprehensive3DSR.from_dataset(srs[1])
    algorithm = [
        item
        for item in document.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109103"
    ]
    assert [item.ManufacturerModelName for item in algorithm] == ["test-pneumonia"]
    with app.sessions() as s:
        study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        rows = s.scalars(
            select(Result).where(Result.study_id == study_id).order_by(Result.id)
        ).all()
    assert [(r.revision, r.superseded) for r in rows] == [(1, True), (2, False)]
    assert rows[1].predecessor_sop_instance_uid == rows[0].sr_sop_instance_uid
