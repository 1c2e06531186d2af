"""Issue 14, problem 2: a finished study pushed again by the PACS (DCMTK ``storescu``) is
ignored by default, re-sent with ``on_duplicate_study = "resend"``, reclassified with
``"reprocess"`` — once per push, audited with the pusher as actor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.app import Radflag
from daemon.settings import Settings
from db.models import AuditEvent, Study
from tests.daemon import conftest as daemon_fixtures
from tests.daemon.conftest import PacsStandIn, make_settings, storescu, wait_until
from tests.dicom_io.conftest import make_dx, save

pytestmark = pytest.mark.dcmtk

pacs = daemon_fixtures.pacs
start_app = daemon_fixtures.start_app
tiny_models = daemon_fixtures.tiny_models
tiny_bundle = daemon_fixtures.tiny_bundle


def _events(app: Radflag, uid: str, event: str) -> list[AuditEvent]:
    with app.sessions() as s:
        return list(
            s.scalars(
                select(AuditEvent).where(
                    AuditEvent.study_instance_uid == uid, AuditEvent.event_type == event
                )
            ).all()
        )


def _state(app: Radflag, uid: str) -> str | None:
    with app.sessions() as s:
        return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))


@pytest.mark.parametrize(
    ("mode", "objects_after_repush", "event"),
    [
        ("ignore", 2, None),
        ("resend", 4, "STUDY_RESEND_REQUESTED"),
        # Re-classified with the same content: the same SOP instances, which the PACS already
        # holds, so nothing is sent again (issue 13: at most once per destination per revision).
        ("reprocess", 2, "STUDY_REPROCESS_REQUESTED"),
    ],
)
def test_duplicate_push_of_a_finished_study(
    mode: str,
    objects_after_repush: int,
    event: str | None,
    tmp_path: Path,
    pacs: PacsStandIn,
    start_app: Callable[[Settings], Radflag],
) -> None:
    app = start_app(make_settings(tmp_path, pacs.port, completion={"on_duplicate_study": mode}))
    first = make_dx(seed=3)
    second = make_dx(seed=4)
    second.StudyInstanceUID = first.StudyInstanceUID
    files = [save(first, tmp_path / "a.dcm"), save(second, tmp_path / "b.dcm")]
    uid = str(first.StudyInstanceUID)
    assert storescu(app.port, *files).returncode == 0
    pacs.wait_for(2)  # SR + SC
    wait_until(lambda: _state(app, uid) == "DONE", what="DONE")

    again = storescu(app.port, *files)  # the PACS pushes the same two instances again
    assert again.returncode == 0, again.stderr
    assert len(_events(app, uid, "INSTANCE_DUPLICATE")) == 2
    if objects_after_repush > 2:
        pacs.wait_for(objects_after_repush)
    wait_until(lambda: _state(app, uid) == "DONE", what="DONE after the push")
    time.sleep(1.5)  # nothing more arrives: one action per push, not one per instance
    assert len(pacs.received) == objects_after_repush
    if event is None:
        assert _events(app, uid, "STUDY_RESEND_REQUESTED") == []
        assert _events(app, uid, "STUDY_REPROCESS_REQUESTED") == []
        return
    (done,) = _events(app, uid, event)
    assert done.actor.startswith("dup:MODALITY@")
    if mode == "reprocess":
        assert len(_events(app, uid, "DELIVERY_SKIPPED")) == 2
        return
    # The re-sent objects are the same SOP instances (the PACS replaces its copy).
    uids = [str(ds.SOPInstanceUID) for ds in pacs.received]
    assert sorted(uids[:2]) == sorted(uids[2:])
