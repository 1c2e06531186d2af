"""Orthanc as the hospital PACS: it pushes a study to ``radflag serve``; the SR lands back in it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import Study
from db.queries import audit_trail
from tests.conftest import shared_path
from tests.e2e.conftest import ServeProcess
from tests.peers.dicomgen import kermany_images, make_study
from tests.peers.netns import NetNamespace
from tests.peers.orthanc import OrthancPeer

pytestmark = [pytest.mark.orthanc, pytest.mark.shared, pytest.mark.slow]


def _wait_for_sr(orthanc: OrthancPeer, study_uid: str, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        instances = orthanc.study_instances(study_uid)
        srs = [i for i in instances if orthanc.get_instance_tags(i["ID"]).get("Modality") == "SR"]
        if srs:
            return srs
        time.sleep(0.5)
    raise AssertionError("no SR arrived in Orthanc's study")


def test_orthanc_pushes_study_and_gets_sr_in_same_study(
    netns: NetNamespace, orthanc: OrthancPeer, start_serve, tmp_path: Path
) -> None:
    kermany = shared_path("cxr", "kermany-pneumonia-train")
    study = make_study(
        2, tmp_path / "study", images=kermany_images(kermany, 2, label="normal", offset=10)
    )
    for path in study.paths:
        orthanc.upload(path)
    serve: ServeProcess = start_serve(netns, [("orthanc", orthanc.aet, orthanc.dicom_port)])
    orthanc.set_modality("radflag", "RADFLAG", "127.0.0.1", serve.port)
    assert orthanc.echo("radflag")

    study_id = orthanc.find_study(study.study_uid)
    assert study_id is not None
    orthanc.push_study("radflag", study_id)

    (sr,) = _wait_for_sr(orthanc, study.study_uid, timeout_s=120)
    tags = orthanc.get_instance_tags(sr["ID"])
    assert tags["StudyInstanceUID"] == study.study_uid
    assert tags["PatientID"] == study.patient_id
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"
    assert len(orthanc.study_instances(study.study_uid)) == 3  # 2 images + 1 SR

    # A late image re-opens the study; the new SR keeps its UID, so it replaces the old one.
    late = make_study(
        1,
        tmp_path / "late",
        images=kermany_images(kermany, 1, label="normal", offset=20),
        study_uid=study.study_uid,
        patient_id=study.patient_id,
    )
    late_id = orthanc.upload(late.paths[0])
    orthanc.push("radflag", [late_id])
    sessions = make_session_factory(make_engine(serve.db_url))

    def done_twice() -> bool:
        events = [e.event_type for e in audit_trail(sessions, study.study_uid)]
        return events.count("STUDY_DONE") == 2

    deadline = time.monotonic() + 120
    while not done_twice():
        assert time.monotonic() < deadline, "re-processed study did not finish"
        time.sleep(0.5)
    assert len(orthanc.study_instances(study.study_uid)) == 4  # 3 images + still 1 SR
    assert len(_wait_for_sr(orthanc, study.study_uid, timeout_s=5)) == 1
    assert serve.stop() == 0
    with sessions() as s:
        assert s.scalar(select(Study.state)) == "DONE"
