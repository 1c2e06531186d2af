"""``radflag audit`` filters and the study timeline, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.admin_timeline import study_timeline
from db.audit import AuditEventType, audit
from db.queries import AuditQuery, search_audit
from db.states import StudyState
from tests.db.conftest import ResultSpec, add_study

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def populated(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    v1_pos = ResultSpec(model_version="1.0.0", probability=0.9, positive=True)
    v2_neg = ResultSpec(model_version="2.0.0", probability=0.1, positive=False)
    add_study(
        sessions,
        "1.1",
        state="DONE",
        received_at=T0,
        quiet_s=30,
        classify_s=2,
        deliver_s=1,
        results=(v1_pos,),
    )
    add_study(
        sessions,
        "1.2",
        state="DONE",
        calling_ae="CT_ROOM",
        received_at=T0 + timedelta(hours=1),
        quiet_s=30,
        classify_s=2,
        deliver_s=1,
        results=(v2_neg,),
    )
    add_study(
        sessions,
        "1.3",
        state="FAILED",
        received_at=T0 + timedelta(hours=2),
        quiet_s=30,
        failure_reason="cannot decode pixel data",
    )
    add_study(
        sessions,
        "1.4",
        state="DONE",
        received_at=T0 + timedelta(hours=3),
        quiet_s=30,
        classify_s=2,
        deliver_s=1,
        results=(ResultSpec(model_version="1.0.0", positive=True, superseded=True), v2_neg),
    )
    with sessions.begin() as s:
        audit(s, AuditEventType.DAEMON_STARTED, actor="daemon:x", at=T0 - timedelta(minutes=1))
        for ae in ("CT_ROOM", "CTXROOM"):
            audit(
                s,
                AuditEventType.ASSOCIATION_REJECTED,
                actor=f"scp:{ae}@10.0.0.5",
                at=T0 + timedelta(hours=1, minutes=5),
                detail={"reason": "calling AE not allowed"},
            )
    return sessions


def _studies(rows: list) -> set[str | None]:
    return {r.study_instance_uid for r in rows}


def test_unfiltered_is_everything_in_time_order(populated: sessionmaker[Session]) -> None:
    rows = search_audit(populated, AuditQuery())
    assert rows[0].event_type == "DAEMON_STARTED"
    assert [(r.at, r.id) for r in rows] == sorted((r.at, r.id) for r in rows)
    assert _studies(rows) == {None, "1.1", "1.2", "1.3", "1.4"}
    newest = search_audit(populated, AuditQuery(newest_first=True, limit=2))
    assert [r.id for r in newest] == [r.id for r in reversed(rows)][:2]


def test_time_window_is_half_open(populated: sessionmaker[Session]) -> None:
    rows = search_audit(populated, AuditQuery(since=T0, until=T0 + timedelta(hours=1)))
    assert _studies(rows) == {"1.1"}
    first = search_audit(populated, AuditQuery(study_instance_uid="1.2"))[0]
    rows = search_audit(populated, AuditQuery(until=first.at))
    assert "1.2" not in _studies(rows)


def test_calling_ae_matches_studies_and_listener_events(populated: sessionmaker[Session]) -> None:
    rows = search_audit(populated, AuditQuery(calling_ae="CT_ROOM"))
    assert _studies(rows) == {"1.2", None}
    rejected = [r for r in rows if r.event_type == "ASSOCIATION_REJECTED"]
    assert [r.actor for r in rejected] == ["scp:CT_ROOM@10.0.0.5"]  # not CTXROOM: '_' escaped
    assert all(r.calling_ae == "CT_ROOM" for r in rows if r.study_instance_uid)


def test_event_type_study_and_state_filters(populated: sessionmaker[Session]) -> None:
    rows = search_audit(
        populated,
        AuditQuery(event_types=(AuditEventType.DELIVERY_SENT, AuditEventType.DAEMON_STARTED)),
    )
    assert {r.event_type for r in rows} == {"DELIVERY_SENT", "DAEMON_STARTED"}
    assert len(rows) == 4
    rows = search_audit(populated, AuditQuery(study_instance_uid="1.4"))
    assert _studies(rows) == {"1.4"} and rows[0].study_state == "DONE"
    rows = search_audit(populated, AuditQuery(state=StudyState.FAILED))
    assert _studies(rows) == {"1.3"}


def test_result_filters(populated: sessionmaker[Session]) -> None:
    def uids(**kw: object) -> set[str | None]:
        return _studies(search_audit(populated, AuditQuery(**kw)))  # type: ignore[arg-type]

    assert uids(finding="PNEUMONIA", positive=True) == {"1.1", "1.4"}  # 1.4: superseded result
    assert uids(finding="233604007") == {"1.1", "1.2", "1.4"}
    assert uids(finding="Atelectasis") == set()
    assert uids(positive=False) == {"1.2", "1.4"}
    assert uids(model_name="pneumonia", model_version="2.0.0") == {"1.2", "1.4"}
    assert uids(model_version="2.0.0", positive=True) == set()  # same result must match all
    assert uids(model_name="other") == set()


def test_query_validation() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        AuditQuery(since=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="earlier"):
        AuditQuery(since=T0, until=T0)
    with pytest.raises(ValueError, match="limit"):
        AuditQuery(limit=0)


def test_study_timeline(populated: sessionmaker[Session]) -> None:
    assert study_timeline(populated, "9.9.9") is None
    tl = study_timeline(populated, "1.4")
    assert tl is not None
    assert tl.study.state == "DONE" and tl.study.calling_ae == "MODALITY"
    assert [i.sop_instance_uid for i in tl.instances] == ["1.4.1"]
    assert [(r.model_version, r.superseded) for r in tl.results] == [
        ("1.0.0", True),
        ("2.0.0", False),
    ]
    assert all(len(r.weights_sha256) == 64 for r in tl.results)
    (delivery,) = tl.deliveries
    assert delivery.state == "SENT" and [a.ok for a in delivery.attempt_history] == [True]
    assert [e.event_type for e in tl.events] == [
        "INSTANCE_RECEIVED",
        "STUDY_CLASSIFIED",
        "STUDY_CLASSIFIED",
        "DELIVERY_SENT",
    ]
    data = json.loads(json.dumps(tl.as_dict()))
    assert data["study"]["study_instance_uid"] == "1.4"
    assert data["deliveries"][0]["attempt_history"][0]["ok"] is True
    assert data["events"][0]["at"] == tl.events[0].at.isoformat()
    failed = study_timeline(populated, "1.3")
    assert failed is not None
    assert failed.study.failure_reason == "cannot decode pixel data"
    assert failed.results == () and failed.deliveries == ()
