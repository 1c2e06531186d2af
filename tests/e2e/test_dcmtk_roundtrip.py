"""Issue 2's slice with independent peers: DCMTK sends to ``radflag serve``, DCMTK receives the SR.

The PACS is DCMTK ``storescp`` in a private network namespace; the sender is DCMTK
``dcmsend``; radflag is the real ``radflag serve`` process on the bundled default model.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import Result, Study
from db.queries import audit_trail
from tests.conftest import shared_path
from tests.daemon.conftest import TRAIL_TWO_IMAGES_SR_AND_SC
from tests.dicom_io.conftest import require_tool
from tests.e2e.conftest import ServeProcess
from tests.peers.dcmtk import StoreSCP, dcmsend
from tests.peers.dicomgen import kermany_images, make_study
from tests.peers.netns import NetNamespace

pytestmark = [pytest.mark.dcmtk, pytest.mark.shared, pytest.mark.slow]


def test_dcmtk_sends_chest_dx_and_receives_sr(
    netns: NetNamespace, storescp: StoreSCP, start_serve, tmp_path: Path
) -> None:
    kermany = shared_path("cxr", "kermany-pneumonia-train")
    study = make_study(
        2,
        tmp_path / "study",
        images=kermany_images(kermany, 2, label="pneumonia"),
        photometric="MONOCHROME1",
    )
    serve: ServeProcess = start_serve(netns, [("pacs", storescp.aet, storescp.port)])

    sent = dcmsend(serve.port, study.paths, ns=netns, called_aet="RADFLAG", calling_aet="MODALITY")
    assert sent.returncode == 0, sent.stdout + sent.stderr

    by_modality = {
        dcmread(p, stop_before_pixels=True).Modality: p for p in storescp.wait_for(2, timeout_s=120)
    }
    sr_path, sc_path = by_modality["SR"], by_modality["OT"]
    sr = dcmread(sr_path)
    sc = dcmread(sc_path)
    assert sc.StudyInstanceUID == study.study_uid and sc.BurnedInAnnotation == "YES"
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == study.study_uid
    assert sr.PatientID == study.patient_id

    dump = subprocess.run(
        [require_tool("dsrdump"), "-Ec", str(sr_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert dump.returncode == 0, dump.stderr
    assert "233604007" in dump.stdout and "Pneumonia" in dump.stdout
    match = re.search(r'Probability[^=]*=\s*"([0-9.]+)"', dump.stdout)
    assert match, dump.stdout
    sr_probability = float(match.group(1))

    for path in (sr_path, sc_path):
        dciodvfy = subprocess.run(
            [require_tool("dciodvfy"), str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        errors = [line for line in dciodvfy.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], dciodvfy.stderr

    assert serve.stop() == 0  # SIGTERM: graceful, exit status 0
    sessions = make_session_factory(make_engine(serve.db_url))
    with sessions() as s:
        state = s.scalar(select(Study.state).where(Study.study_instance_uid == study.study_uid))
        result = s.scalars(select(Result)).one()
    assert state == "DONE"
    assert result.probability == pytest.approx(sr_probability, abs=1e-3)
    assert result.model_name == "radflag-pneumonia-cxr"
    assert result.n_images == 2
    events = [e.event_type for e in audit_trail(sessions, study.study_uid)]
    assert events == TRAIL_TWO_IMAGES_SR_AND_SC
    log = serve.log()
    assert study.patient_id not in log  # no patient data in INFO logs
    assert '"msg": "radflag stopped"' in log
