"""The audit log is append-only in the database itself (triggers of migration 0002)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, delete, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from db.audit import AuditEventType, audit
from db.models import AuditEvent


def _one_event(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as s:
        row = audit(s, AuditEventType.DAEMON_STARTED, actor="daemon:test", detail={"n": 1})
        s.flush()
        return row.id


def test_update_and_delete_are_refused(engine: Engine, sessions: sessionmaker[Session]) -> None:
    event_id = _one_event(sessions)
    for statement in (
        update(AuditEvent).where(AuditEvent.id == event_id).values(actor="someone else"),
        delete(AuditEvent).where(AuditEvent.id == event_id),
    ):
        with (
            pytest.raises(DBAPIError, match="audit_events is append-only"),
            engine.begin() as conn,
        ):
            conn.execute(statement)
    # Through the ORM as well.
    with pytest.raises(DBAPIError, match="append-only"), sessions.begin() as s:
        row = s.get(AuditEvent, event_id)
        assert row is not None
        row.detail = {"n": 2}
    with sessions() as s:
        row = s.get(AuditEvent, event_id)
        assert row is not None
        assert (row.actor, row.detail) == ("daemon:test", {"n": 1})
    # Appending still works.
    assert _one_event(sessions) > event_id
    with sessions() as s:
        assert len(s.scalars(select(AuditEvent)).all()) == 2


def test_truncate_refused_on_postgresql(engine: Engine, sessions: sessionmaker[Session]) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("TRUNCATE exists only on PostgreSQL")
    _one_event(sessions)
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("TRUNCATE audit_events"))
    with sessions() as s:
        assert len(s.scalars(select(AuditEvent)).all()) == 1
