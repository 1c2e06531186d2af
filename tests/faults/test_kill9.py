"""kill -9 during classification, then restart: every study finishes within a minute (issue 11).

Before issue 12 leases lasted 600 s and were handed back only on a graceful stop, so a study
interrupted by SIGKILL stayed PROCESSING for ten minutes. Now the restarted process finds its
dead previous incarnation in the process registry and gives its studies back at once.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage
from sqlalchemy import func, select

from db.engine import make_engine, make_session_factory
from db.models import AuditEvent, Result, Study
from tests.cluster.serve import free_port, launch, write_config
from tests.conftest import shared_path
from tests.daemon.conftest import storage_scp, tiny_bundle  # noqa: F401 - fixture
from tests.peers.dcmtk import dcmsend
from tests.peers.dicomgen import kermany_images, make_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow, pytest.mark.shared]

N_STUDIES = 20


def _states(sessions: object) -> Counter[str]:
    with sessions() as s:  # type: ignore[operator]
        return Counter(
            dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
        )


def test_kill9_during_classification_then_restart_finishes_all(
    tmp_path: Path,
    tiny_bundle: Path,  # noqa: F811
) -> None:
    source = shared_path("cxr", "kermany-pneumonia-train")
    images = kermany_images(source, N_STUDIES, offset=40)
    files: list[Path] = []
    for i, image in enumerate(images):
        files += make_study(1, tmp_path / f"s{i}", images=[image], patient_id=f"K9-{i}").paths
    db_file = tmp_path / "radflag.db"
    sessions = make_session_factory(make_engine(f"sqlite:///{db_file}"))
    with storage_scp(0, [Comprehensive3DSRStorage, ComprehensiveSRStorage]) as pacs:
        port = free_port()
        cfg = write_config(
            tmp_path / "radflag.toml",
            db_url=f"sqlite:///{db_file}",
            store=tmp_path / "store",
            port=port,
            bundle=tiny_bundle,
            pacs_port=pacs.port,
            lease_s=30.0,  # the default: recovery must not wait for it
        )
        first = launch(cfg, port, tmp_path / "first.log")
        try:
            sent = dcmsend(port, files, called_aet="RADFLAG", calling_aet="MODALITY")
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 60
            while _states(sessions)["PROCESSING"] == 0:
                assert time.monotonic() < deadline, "no study was ever claimed"
                time.sleep(0.02)
        finally:
            first.kill9()
        at_kill = _states(sessions)
        assert at_kill["PROCESSING"] >= 1, at_kill

        restarted_at = time.monotonic()
        second = launch(cfg, port, tmp_path / "second.log")
        try:
            while _states(sessions)["DONE"] < N_STUDIES:
                assert time.monotonic() - restarted_at < 60, (
                    _states(sessions),
                    second.log()[-2000:],
                )
                time.sleep(0.2)
            recovery_s = time.monotonic() - restarted_at
        finally:
            second.stop()
    print(f"kill -9 with {dict(at_kill)}: all {N_STUDIES} DONE {recovery_s:.1f} s after restart")
    with sessions() as s:
        per_study = Counter(
            s.scalars(select(Result.study_id).where(Result.superseded.is_(False))).all()
        )
        reclaimed = s.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "LEASE_RECLAIMED")
        ).all()
        dead = s.scalars(select(AuditEvent).where(AuditEvent.event_type == "PROCESS_DEAD")).one()
    assert len(per_study) == N_STUDIES and set(per_study.values()) == {1}
    assert len(reclaimed) == at_kill["PROCESSING"]
    assert dead.detail["pid"] == first.proc.pid and dead.detail["reason"] == "pid gone on restart"
    assert all(e.process_id and e.process_id != dead.detail["dead_process"] for e in reclaimed)
    sr_uids = [str(ds.SOPInstanceUID) for ds in pacs.received]
    assert len(set(sr_uids)) == N_STUDIES  # one result object per study (re-sends keep the UID)
