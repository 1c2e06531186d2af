"""Orthanc configured from the README's own snippet files (``deploy/orthanc/``) routes a
chest study to radflag by itself, and radflag's results come back into the study.

No REST push: the study is only uploaded to Orthanc (as a modality would store it); the Lua
``OnStableStudy`` script forwards its CR/DX series to the ``radflag`` modality once stable.
A CT series of the same study is not forwarded, and radflag's returning SR/SC do not make
Orthanc forward the images again.

The snippets are used as shipped; the test changes only what the README tells the reader to
change (radflag's address in ``DicomModalities``, the Lua script's path) and shortens
``StableAge`` from 60 s to 2 s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import AuditEvent, Instance
from tests.conftest import REPO_ROOT, shared_path
from tests.e2e.conftest import launch_serve
from tests.peers.dicomgen import kermany_images, make_study
from tests.peers.fixtures import netns  # noqa: F401 - fixture
from tests.peers.netns import NetNamespace
from tests.peers.orthanc import OrthancPeer, orthanc_available

pytestmark = [pytest.mark.orthanc, pytest.mark.shared, pytest.mark.slow]

SNIPPETS = REPO_ROOT / "deploy" / "orthanc"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"


def orthanc_config_from_snippet(radflag_port: int) -> dict[str, object]:
    """The shipped ``orthanc-radflag.json`` with radflag's address and the script's path."""
    cfg = json.loads((SNIPPETS / "orthanc-radflag.json").read_text())
    aet, _host, _port = cfg["DicomModalities"]["radflag"]
    assert aet == "RADFLAG"
    cfg["DicomModalities"]["radflag"] = [aet, "127.0.0.1", radflag_port]
    assert cfg["LuaScripts"] == ["/etc/orthanc/radflag-autoroute.lua"]
    cfg["LuaScripts"] = [str(SNIPPETS / "radflag-autoroute.lua")]
    assert cfg["OverwriteInstances"] is True
    cfg["StableAge"] = 2
    return cfg


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_orthanc_routes_chest_studies_to_radflag_by_itself(
    netns: NetNamespace,  # noqa: F811
    tmp_path: Path,
) -> None:
    if not orthanc_available():
        pytest.skip("Orthanc not installed (/usr/sbin/Orthanc)")
    kermany = shared_path("cxr", "kermany-pneumonia-train")
    study = make_study(
        2, tmp_path / "study", images=kermany_images(kermany, 2, label="pneumonia", offset=50)
    )
    ct = dcmread(study.paths[0])  # a CT series in the same study: not for radflag
    ct.Modality = "CT"
    ct.SeriesInstanceUID = generate_uid()
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.save_as(tmp_path / "ct.dcm")

    orthanc_port = netns.free_port()
    serve = launch_serve(netns, tmp_path, [("orthanc", "ORTHANC", orthanc_port)])
    try:
        with OrthancPeer(
            tmp_path / "orthanc",
            ns=netns,
            dicom_port=orthanc_port,
            extra_config=orthanc_config_from_snippet(serve.port),
        ) as pacs:
            for path in [*study.paths, tmp_path / "ct.dcm"]:
                pacs.upload(path)  # stored in Orthanc; nothing tells it to send anything

            def results_back() -> bool:
                classes = [
                    pacs.get_instance_tags(i["ID"]).get("SOPClassUID")
                    for i in pacs.study_instances(study.study_uid)
                ]
                return classes.count(SR_3D) == 1 and classes.count(SC) == 1

            _wait(results_back, 180, "radflag's SR and SC in Orthanc")
            # The study became unstable again when the results arrived; let StableAge pass
            # twice: the Lua script must not forward the same images again.
            time.sleep(6)
            log = pacs.log()
        forwarded = [ln for ln in log.splitlines() if "radflag: forwarding series" in ln]
        assert len(forwarded) == 1, log[-3000:]

        engine = make_engine(serve.db_url)
        with make_session_factory(engine)() as s:
            received = s.execute(select(Instance.sop_instance_uid, Instance.calling_ae)).all()
            duplicates = s.scalars(
                select(AuditEvent).where(AuditEvent.event_type == "INSTANCE_DUPLICATE")
            ).all()
        engine.dispose()
        assert sorted(uid for uid, _ in received) == sorted(study.sop_instance_uids)
        assert {ae for _, ae in received} == {"ORTHANC"}  # routed by Orthanc itself
        assert duplicates == []
    finally:
        serve.stop()
