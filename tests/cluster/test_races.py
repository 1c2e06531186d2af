"""Race tests on PostgreSQL that pin the bugs issue 12 reproduced with two processes.

Each interleaving is forced, not hoped for: a statement hook parks one transaction right
after it read the study row, while the other side runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from daemon.delivery import deliver_due
from daemon.settings import DeliverySettings
from db.ingest import NewInstance, PatientIdPolicy, record_instance
from db.models import AuditEvent, Study, utcnow
from db.queue import LeaseLost, claim_next, finish_not_applicable, mark_ready
from db.results import OutputRecord, ResultRecord, record_classification
from dicom_io.spool import Spool
from tests.peers.dicomgen import make_synthetic_dx

pytestmark = pytest.mark.postgres

POLICY = PatientIdPolicy(key=b"k" * 32)
STUDY = "1.2.826.0.1.3680043.8.498.12"


def _inst(sop: str) -> NewInstance:
    return NewInstance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid=STUDY,
        series_instance_uid=STUDY + ".1",
        modality="DX",
        patient_id="PAT-1",
        calling_ae="MODALITY",
        peer_host="127.0.0.1",
        path=f"{STUDY}/{sop}.dcm",
        size_bytes=1234,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


class _ParkAfterStudyRead:
    """Park the thread ``owner`` right after its first SELECT on ``studies`` (lock held)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.owner: int | None = None
        self.read = threading.Event()
        self.go = threading.Event()

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() != self.owner or self.read.is_set():
            return
        if statement.lstrip().upper().startswith("SELECT") and "FROM studies" in statement:
            self.read.set()
            self.go.wait(10)


@pytest.fixture
def park(pg_engine: Engine) -> Iterator[_ParkAfterStudyRead]:
    hook = _ParkAfterStudyRead(pg_engine)
    event.listen(pg_engine, "after_cursor_execute", hook)
    yield hook
    hook.go.set()
    event.remove(pg_engine, "after_cursor_execute", hook)


def test_late_instance_during_claim_is_never_left_out(
    pg_sessions: sessionmaker[Session], park: _ParkAfterStudyRead
) -> None:
    """Ingest reads the study, the scheduler and a worker claim it, then ingest commits.

    Before the fix (no row lock; state written only if it changed) the study stayed
    PROCESSING with a claim that did not include the late instance, then ended DONE with
    one of two instances classified and no STUDY_REOPENED row.
    """
    old = utcnow()
    record_instance(pg_sessions, _inst(STUDY + ".1.1"), POLICY, now=old)
    time.sleep(0.05)

    def late() -> None:
        park.owner = threading.get_ident()
        record_instance(pg_sessions, _inst(STUDY + ".1.2"), POLICY)

    ingest = threading.Thread(target=late)
    ingest.start()
    assert park.read.wait(10), "ingest never read the study"
    mark_ready(pg_sessions, quiet_period_s=0.0)  # the study has been quiet since `old`
    claim = claim_next(pg_sessions, "other-process", lease_s=30)
    park.go.set()
    ingest.join(10)

    with pg_sessions() as s:
        study = s.scalars(select(Study)).one()
        kinds = [e.event_type for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    if study.state == "PROCESSING":  # a claim won: it must hold both instances
        assert claim is not None and len(claim.instances) == 2, (study.state, kinds)
    else:  # the late instance won: the study is receiving again, any claim is void
        assert study.state == "RECEIVING", kinds
        assert claim is None or "STUDY_REOPENED" in kinds


def test_instance_during_processing_reopens_and_voids_the_run(
    pg_sessions: sessionmaker[Session],
) -> None:
    record_instance(pg_sessions, _inst(STUDY + ".1.1"), POLICY, now=utcnow())
    mark_ready(pg_sessions, quiet_period_s=0.0)
    claim = claim_next(pg_sessions, "w1", lease_s=30)
    assert claim is not None
    record_instance(pg_sessions, _inst(STUDY + ".1.2"), POLICY)
    with pg_sessions() as s:
        study = s.scalars(select(Study)).one()
        reopened = s.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "STUDY_REOPENED")
        ).one()
    assert study.state == "RECEIVING" and study.lease_owner is None
    assert reopened.detail == {
        "from_state": "PROCESSING",
        "to_state": "RECEIVING",
        "lease_owner": "w1",
    }
    with pytest.raises(LeaseLost):
        finish_not_applicable(pg_sessions, claim, {})


class _SlowPacs:
    """A Storage SCP that takes ``delay_s`` per C-STORE and counts them."""

    def __init__(self, delay_s: float) -> None:
        self.count = 0
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)

        def on_store(event: evt.Event) -> int:
            time.sleep(delay_s)
            with self._lock:
                self.count += 1
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        self.port = int(self.server.server_address[1])


def test_two_senders_send_a_due_result_once(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    results = Spool(tmp_path / "results")
    payload = tmp_path / "results" / "sr.dcm"
    ds = make_synthetic_dx(32, 32, payload)
    pacs = _SlowPacs(delay_s=1.0)
    try:
        record_instance(pg_sessions, _inst(STUDY + ".1.1"), POLICY, now=utcnow())
        mark_ready(pg_sessions, quiet_period_s=0.0)
        claim = claim_next(pg_sessions, "w1", lease_s=30)
        assert claim is not None
        out = OutputRecord(
            destination="pacs",
            ae_title="PACS",
            host="127.0.0.1",
            port=pacs.port,
            kind="SR",
            sop_instance_uid=str(ds.SOPInstanceUID),
            payload_path=str(payload),
        )
        record = ResultRecord(
            model_name="m",
            model_version="1",
            weights_sha256="ab" * 32,
            finding_code="233604007",
            finding_meaning="Pneumonia",
            probability=0.9,
            positive=True,
            threshold=0.5,
            images={},
            timings_ms={},
            device="cpu",
            sr_series_instance_uid="2.25.1",
            sr_sop_instance_uid=str(ds.SOPInstanceUID),
            outputs=(out,),
        )
        assert record_classification(pg_sessions, claim, [record])
        settings = DeliverySettings(backoff_base_s=0.1, timeout_s=10)
        start = threading.Barrier(2)

        def sender() -> None:
            start.wait(5)
            deliver_due(pg_sessions, settings, results)

        threads = [threading.Thread(target=sender) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert pacs.count == 1
    finally:
        pacs.server.shutdown()
