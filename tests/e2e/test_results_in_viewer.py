"""Orthanc as the PACS/viewer: a pushed study gets its SR and heatmap SC back into the same
study; re-processing it (a late image) adds a new revision beside the old one.

Orthanc runs with its DEFAULT configuration (no ``OverwriteInstances``): a changed result is
a new SOP instance (PS3.3 C.17.2), so nothing depends on the PACS overwriting. Afterwards
Orthanc holds both SRs, the newer naming the older in its Predecessor Documents Sequence.
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
from dicom_io.revisions import predecessor_of
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
    with OrthancPeer(tmp_path / "orthanc", ns=netns) as peer:  # default configuration
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


def test_sr_and_sc_land_in_orthanc_and_reprocessing_adds_a_revision(
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
        _wait(lambda: len(_results(pacs, study.study_uid).get(SR_3D, [])) == 2, 30, "second SR")
        second = _results(pacs, study.study_uid)
        assert len(second[SR_3D]) == 2 and len(second[SC]) == 2
        image_class = str(dcmread(study.paths[0], stop_before_pixels=True).SOPClassUID)
        assert len(second[image_class]) == 3  # 2 + the late image
        srs = [dcmread(DicomBytesIO(pacs.download(i))) for i in second[SR_3D]]
        (sr_v2,) = [ds for ds in srs if ds.SOPInstanceUID != sr_v1.SOPInstanceUID]
        assert len(read_sr(sr_v2).source_sop_instance_uids) == 3  # the revision sees 3 images
        (pred,) = predecessor_of(sr_v2)
        assert pred.sop_instance_uid == sr_v1.SOPInstanceUID
        assert pred.series_instance_uid == sr_v1.SeriesInstanceUID
        assert "PredecessorDocumentsSequence" not in sr_v1
        assert serve.stop() == 0
    finally:
        serve.stop()
