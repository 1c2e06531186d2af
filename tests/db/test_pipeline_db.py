"""The database side of the pipeline, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import NewInstance, PatientIdPolicy, record_instance
from db.models import AuditEvent, Delivery, DeliveryAttempt, Study, utcnow
from db.outbox import BackoffPolicy, DeliveryState, claim_due, due_deliveries, record_attempt
from db.queries import audit_trail, list_studies
from db.queue import LeaseLost, claim_next, expire_leases, finish_failed, mark_ready
from db.results import OutputRecord, ResultRecord, record_classification
from db.schema import SchemaMismatch, current_revision, ensure_schema, head_revision

POLICY = PatientIdPolicy(key=b"k" * 32)


def _inst(sop: str, study: str = "1.2.3.4", patient: str | None = "PAT-1") -> NewInstance:
    return NewInstance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        modality="DX",
        patient_id=patient,
        calling_ae="MODALITY",
        peer_host="127.0.0.1",
        path=f"/spool/{sop}.dcm",
        size_bytes=1234,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def _result(outputs: tuple[OutputRecord, ...] = ()) -> ResultRecord:
    return ResultRecord(
        model_name="pneumonia",
        model_version="1.0.0",
        weights_sha256="ab" * 32,
        finding_code="233604007",
        finding_meaning="Pneumonia",
        probability=0.91,
        positive=True,
        threshold=0.5,
        images={"1.2.3.4.5": 0.91},
        timings_ms={"inference": 12.5},
        device="cpu",
        sr_series_instance_uid="2.25.1",
        sr_sop_instance_uid="2.25.2",
        outputs=outputs,
    )


def _output() -> OutputRecord:
    return OutputRecord(
        destination="pacs",
        ae_title="PACS",
        host="127.0.0.1",
        port=104,
        kind="SR",
        sop_instance_uid="2.25.2",
        payload_path="/spool/results/sr.dcm",
    )


def test_schema_is_at_head_and_patient_id_pseudonymised(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    assert current_revision(engine) == head_revision()
    assert record_instance(sessions, _inst("1.2.3.4.5"), POLICY) is True
    with sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.patient_key is not None and "PAT-1" not in study.patient_key
        assert len(study.patient_key) == 64


def test_full_lifecycle_and_audit_order(sessions: sessionmaker[Session]) -> None:
    t0 = utcnow() - timedelta(seconds=60)
    assert record_instance(sessions, _inst("1.2.3.4.5"), POLICY, now=t0)
    assert record_instance(sessions, _inst("1.2.3.4.6"), POLICY, now=t0)
    assert record_instance(sessions, _inst("1.2.3.4.5"), POLICY, now=t0) is False  # duplicate
    assert mark_ready(sessions, quiet_period_s=120) == []  # not quiet long enough yet
    assert mark_ready(sessions, quiet_period_s=30) == ["1.2.3.4"]
    claim = claim_next(sessions, "w1", lease_s=300)
    assert claim is not None and len(claim.instances) == 2
    assert claim_next(sessions, "w2", lease_s=300) is None
    assert record_classification(sessions, claim, [_result((_output(),))]) is True
    due = due_deliveries(sessions)
    assert [d.sop_instance_uid for d in due] == ["2.25.2"]
    policy = BackoffPolicy(base_s=0.0, max_attempts=3)
    started = utcnow()
    assert claim_due(sessions, "s1", lease_s=60) == due
    state = record_attempt(
        sessions,
        due[0].delivery_id,
        started_at=started,
        ok=False,
        error="refused",
        retryable=True,
        policy=policy,
        owner="s1",
    )
    assert state is DeliveryState.PENDING
    assert [c.attempts for c in claim_due(sessions, "s1", lease_s=60)] == [1]
    state = record_attempt(
        sessions,
        due[0].delivery_id,
        started_at=started,
        ok=True,
        error=None,
        retryable=True,
        policy=policy,
        owner="s1",
    )
    assert state is DeliveryState.SENT
    events = [e.event_type for e in audit_trail(sessions, "1.2.3.4")]
    assert events == [
        "INSTANCE_RECEIVED",
        "INSTANCE_RECEIVED",
        "INSTANCE_DUPLICATE",
        "STUDY_READY",
        "STUDY_CLAIMED",
        "DELIVERY_QUEUED",
        "STUDY_CLASSIFIED",
        "DELIVERY_ATTEMPT_FAILED",
        "DELIVERY_SENT",
        "STUDY_DONE",
    ]
    with sessions() as s:
        assert s.scalars(select(Study.state)).one() == "DONE"
        assert len(s.scalars(select(DeliveryAttempt)).all()) == 2
    rows = list_studies(sessions)
    assert rows[0].state == "DONE" and rows[0].probability == pytest.approx(0.91)
    assert rows[0].n_instances == 2


def test_late_instance_supersedes_running_work(sessions: sessionmaker[Session]) -> None:
    t0 = utcnow() - timedelta(seconds=60)
    record_instance(sessions, _inst("1.2.3.4.5"), POLICY, now=t0)
    mark_ready(sessions, quiet_period_s=1)
    claim = claim_next(sessions, "w1", lease_s=300)
    assert claim is not None
    record_instance(sessions, _inst("1.2.3.4.7"), POLICY)  # arrives while processing
    with pytest.raises(LeaseLost):
        record_classification(sessions, claim, [_result()])
    with sessions() as s:
        assert s.scalars(select(Study.state)).one() == "RECEIVING"


def test_reprocessing_cancels_old_pending_deliveries(sessions: sessionmaker[Session]) -> None:
    t0 = utcnow() - timedelta(seconds=60)
    record_instance(sessions, _inst("1.2.3.4.5"), POLICY, now=t0)
    mark_ready(sessions, quiet_period_s=1)
    claim = claim_next(sessions, "w1", lease_s=300)
    assert claim is not None
    record_classification(sessions, claim, [_result((_output(),))])
    record_instance(sessions, _inst("1.2.3.4.8"), POLICY, now=t0 + timedelta(seconds=1))
    mark_ready(sessions, quiet_period_s=1)
    claim2 = claim_next(sessions, "w1", lease_s=300)
    assert claim2 is not None
    record_classification(sessions, claim2, [_result((_output(),))])
    with sessions() as s:
        states = sorted(s.scalars(select(Delivery.state)).all())
        assert states == ["CANCELLED", "PENDING"]
    assert len(due_deliveries(sessions)) == 1


def test_dead_letter_after_max_attempts(sessions: sessionmaker[Session]) -> None:
    record_instance(sessions, _inst("1.2.3.4.5"), POLICY, now=utcnow() - timedelta(seconds=9))
    mark_ready(sessions, quiet_period_s=1)
    claim = claim_next(sessions, "w1", lease_s=300)
    assert claim is not None
    record_classification(sessions, claim, [_result((_output(),))])
    (due,) = due_deliveries(sessions)
    policy = BackoffPolicy(base_s=0.0, max_attempts=2)
    for expected in (DeliveryState.PENDING, DeliveryState.DEAD):
        assert [c.delivery_id for c in claim_due(sessions, "s1", lease_s=60)] == [due.delivery_id]
        got = record_attempt(
            sessions,
            due.delivery_id,
            started_at=utcnow(),
            ok=False,
            error="timeout",
            retryable=True,
            policy=policy,
            owner="s1",
        )
        assert got is expected
    with sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.state == "DELIVERY_FAILED"
        assert "timeout" in (study.failure_reason or "")


def test_expired_lease_returns_study_then_fails_after_max_attempts(
    sessions: sessionmaker[Session],
) -> None:
    record_instance(sessions, _inst("1.2.3.4.5"), POLICY, now=utcnow() - timedelta(seconds=9))
    mark_ready(sessions, quiet_period_s=1)
    assert claim_next(sessions, "w1", lease_s=0.0) is not None
    assert expire_leases(sessions, max_attempts=2, now=utcnow() + timedelta(seconds=1)) == [
        "1.2.3.4"
    ]
    claim = claim_next(sessions, "w2", lease_s=0.0)
    assert claim is not None and claim.attempt == 2
    expire_leases(sessions, max_attempts=2, now=utcnow() + timedelta(seconds=1))
    with sessions() as s:
        assert s.scalars(select(Study.state)).one() == "FAILED"
    with pytest.raises(LeaseLost):
        finish_failed(sessions, claim, "too late")


def test_concurrent_ingest_of_one_study(sessions: sessionmaker[Session]) -> None:
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            record_instance(sessions, _inst(f"1.2.3.4.{100 + i}"), POLICY)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with sessions() as s:
        assert len(s.scalars(select(Study)).all()) == 1
        assert (
            len(
                s.scalars(
                    select(AuditEvent).where(AuditEvent.event_type == "INSTANCE_RECEIVED")
                ).all()
            )
            == 8
        )


def test_refuses_unknown_schema(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    with pytest.raises(SchemaMismatch, match="unknown"):
        ensure_schema(engine)


def test_routed_back_result_objects_do_not_reopen_a_finished_study(
    sessions: sessionmaker[Session],
) -> None:
    record_instance(sessions, _inst("1.2.3.4.5"), POLICY, now=utcnow() - timedelta(seconds=9))
    mark_ready(sessions, quiet_period_s=1)
    claim = claim_next(sessions, "w1", lease_s=300)
    assert claim is not None
    record_classification(sessions, claim, [_result()])
    own_sc = NewInstance(
        **{
            **_inst("2.25.99").__dict__,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
            "reopens_study": False,
        }
    )
    assert record_instance(sessions, own_sc, POLICY) is True
    with sessions() as s:
        assert s.scalars(select(Study.state)).one() == "DONE"
    events = [e.event_type for e in audit_trail(sessions, "1.2.3.4")]
    assert events[-1] == "INSTANCE_RECEIVED" and "STUDY_REOPENED" not in events
