"""Orthanc as the PACS/viewer: a pushed study gets its SR and heatmap SC back into the same
study; re-processing it (a late image) replaces both instead of adding copies.

The PACS must accept a new object with an existing SOP Instance UID as a replacement; Orthanc
does so with ``"OverwriteInstances": true`` (documented in the README).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from db.engine import make_engine, make_session_factory
from db.queries import audit_trail
from dicom_io.sr import read_sr
from tests.conftest import shared_path
from tests.e2e.conftest import launch_serve
from tests.peers.dicomgen import kermany_images, make_study
from tests.peers.fixtures import netns  # noqa: F401 - fixture
from tests.peers.netns import NetNamespace
from tests.peers.orthanc import OrthancPeer, orthanc_available

pytestmark = [pytest.mark.orthanc, pytest.mark.shared, pytest.mark.slow]

SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def pacs(netns: NetNamespace, tmp_path: Path) -> Iterator[OrthancPeer]:  # noqa: F811
    if not orthanc_available():
        pytest.skip("Orthanc not installed (/usr/sbin/Orthanc)")
    with OrthancPeer(
        tmp_path / "orthanc", ns=netns, extra_config={"OverwriteInstances": True}
    ) as peer:
        yield peer


def _results(orthanc: OrthancPeer, study_uid: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for inst in orthanc.study_instances(study_uid):
        sop_class = orthanc.get_instance_tags(inst["ID"]).get("SOPClassUID", "")
        out.setdefault(sop_class, []).append(inst["ID"])
    return out


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_sr_and_sc_land_in_orthanc_and_are_replaced_on_reprocessing(
    netns: NetNamespace,  # noqa: F811
    pacs: OrthancPeer,
    tmp_path: Path,
) -> None:
    kermany = shared_path("cxr", "kermany-pneumonia-train")
    study = make_study(
        2, tmp_path / "study", images=kermany_images(kermany, 2, label="pneumonia", offset=30)
    )
    for path in study.paths:
        pacs.upload(path)
    serve = launch_serve(netns, tmp_path, [("orthanc", pacs.aet, pacs.dicom_port)])  # SR + SC
    try:
        pacs.set_modality("radflag", "RADFLAG", "127.0.0.1", serve.port)
        study_id = pacs.find_study(study.study_uid)
        assert study_id is not None
        pacs.push_study("radflag", study_id)

        def both_arrived() -> bool:
            found = _results(pacs, study.study_uid)
            return len(found.get(SR_3D, [])) == 1 and len(found.get(SC, [])) == 1

        _wait(both_arrived, 120, "SR and SC in Orthanc")
        first = _results(pacs, study.study_uid)
        sr_v1 = dcmread(DicomBytesIO(pacs.download(first[SR_3D][0])))
        assert len(read_sr(sr_v1).source_sop_instance_uids) == 2
        sc_tags = pacs.get_instance_tags(first[SC][0])
        assert sc_tags["BurnedInAnnotation"] == "YES"
        assert sc_tags["PatientID"] == study.patient_id

        late = make_study(
            1,
            tmp_path / "late",
            images=kermany_images(kermany, 1, label="pneumonia", offset=40),
            study_uid=study.study_uid,
            patient_id=study.patient_id,
        )
        pacs.push("radflag", [pacs.upload(late.paths[0])])
        sessions = make_session_factory(make_engine(serve.db_url))

        def done_twice() -> bool:
            events = [e.event_type for e in audit_trail(sessions, study.study_uid)]
            return events.count("STUDY_DONE") == 2

        _wait(done_twice, 120, "re-processed study DONE")
        second = _results(pacs, study.study_uid)
        assert len(second[SR_3D]) == 1 and len(second[SC]) == 1
        image_class = str(dcmread(study.paths[0], stop_before_pixels=True).SOPClassUID)
        assert len(second[image_class]) == 3  # 2 + the late image
        sr_v2 = dcmread(DicomBytesIO(pacs.download(second[SR_3D][0])))
        assert sr_v2.SOPInstanceUID == sr_v1.SOPInstanceUID
        assert len(read_sr(sr_v2).source_sop_instance_uids) == 3  # the replacement, not v1
        assert serve.stop() == 0
    finally:
        serve.stop()
