"""Alembic migrations on both engines: from empty, from 0001 with data, and the refusal paths."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text

from daemon.cli import main
from db.engine import make_engine, make_session_factory
from db.models import (
    AuditEvent,
    Base,
    Delivery,
    DeliveryAttempt,
    Instance,
    ModelRecord,
    Result,
    Study,
    utcnow,
)
from db.schema import (
    SchemaMismatch,
    alembic_config_for_scripts,
    current_revision,
    ensure_schema,
    head_revision,
    upgrade,
)


def test_revision_chain_is_linear_from_0001() -> None:
    script = ScriptDirectory.from_config(alembic_config_for_scripts())
    revisions = list(script.walk_revisions())  # head first
    assert [r.revision for r in reversed(revisions)][:2] == ["0001", "0002"]
    assert len(script.get_heads()) == 1
    assert revisions[-1].down_revision is None


def test_upgrade_from_empty_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def _insert_0001_rows(conn: object) -> None:
    now = utcnow()
    execute = conn.execute  # type: ignore[attr-defined]
    execute(
        text(
            "INSERT INTO studies (id, study_instance_uid, state, patient_key, calling_ae, "
            "first_received_at, last_received_at, ready_at, classified_at, finished_at, "
            "processing_attempts, max_probability, urgent, updated_at) VALUES (1, '1.2.3', "
            "'DONE', 'k', 'MODALITY', :t0, :t0, :t1, :t2, :t3, 1, 0.8, true, :t3)"
        ),
        {
            "t0": now,
            "t1": now + timedelta(seconds=1),
            "t2": now + timedelta(seconds=2),
            "t3": now + timedelta(seconds=3),
        },
    )
    execute(
        text(
            "INSERT INTO instances (id, study_id, sop_instance_uid, sop_class_uid, "
            "series_instance_uid, modality, path, size_bytes, calling_ae, received_at, "
            "duplicate_count, quarantined) VALUES (1, 1, '1.2.3.1', '1.2.840.10008.5.1.4.1.1.1.1',"
            " '1.2.3.0', 'DX', '/spool/a.dcm', 10, 'MODALITY', :t0, 0, false)"
        ),
        {"t0": now},
    )
    execute(
        text(
            "INSERT INTO results (id, study_id, model_name, model_version, weights_sha256, "
            "finding_code, finding_meaning, probability, positive, threshold, n_images, images, "
            "timings_ms, device, superseded, created_at) VALUES (1, 1, 'pneumonia', '1.0.0', "
            ":sha, '233604007', 'Pneumonia', 0.8, true, 0.5, 1, :images, '{}', 'cpu', false, :t)"
        ),
        {"sha": "ab" * 32, "images": '{"1.2.3.1": 0.8}', "t": now},
    )
    execute(
        text(
            "INSERT INTO deliveries (id, study_id, result_id, destination, ae_title, host, port, "
            "kind, sop_instance_uid, payload_path, state, attempts, created_at, sent_at) VALUES "
            "(1, 1, 1, 'pacs', 'PACS', 'h', 104, 'SR', '2.25.1', '/r/sr.dcm', 'SENT', 1, :t, :t)"
        ),
        {"t": now},
    )
    execute(
        text(
            "INSERT INTO delivery_attempts (id, delivery_id, started_at, finished_at, ok) "
            "VALUES (1, 1, :t, :t, true)"
        ),
        {"t": now},
    )
    execute(
        text(
            "INSERT INTO audit_events (id, at, event_type, actor, study_id, study_instance_uid, "
            "detail) VALUES (1, :t, 'STUDY_DONE', 'outbox', 1, '1.2.3', :d)"
        ),
        {"t": now, "d": '{"from_state": "DELIVERING"}'},
    )


def test_upgrade_from_0001_keeps_rows(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        assert "models" not in inspect(engine).get_table_names()
        with pytest.raises(SchemaMismatch, match="radflag db upgrade"):
            ensure_schema(engine)
        with engine.begin() as conn:
            _insert_0001_rows(conn)
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        sessions = make_session_factory(engine)
        with sessions() as s:
            study = s.scalars(select(Study)).one()
            assert (study.study_instance_uid, study.state, study.calling_ae) == (
                "1.2.3",
                "DONE",
                "MODALITY",
            )
            assert study.urgent is True and study.max_probability == pytest.approx(0.8)
            assert s.scalars(select(Instance.path)).one() == "/spool/a.dcm"
            result = s.scalars(select(Result)).one()
            assert result.images == {"1.2.3.1": 0.8}
            assert result.weights_sha256 == "ab" * 32
            assert s.scalars(select(Delivery.state)).one() == "SENT"
            assert s.scalars(select(DeliveryAttempt.ok)).one() is True
            event = s.scalars(select(AuditEvent)).one()
            assert event.detail == {"from_state": "DELIVERING"}
            assert s.scalars(select(ModelRecord)).all() == []
        ensure_schema(engine)  # accepted now
    finally:
        engine.dispose()


def test_downgrade_to_0001_and_upgrade_again(db_url: str) -> None:
    from alembic import command

    from db.schema import alembic_config

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        command.downgrade(alembic_config(engine), "0001")
        assert current_revision(engine) == "0001"
        assert "models" not in inspect(engine).get_table_names()
        with engine.begin() as conn:  # triggers are gone with 0002: rows may change again
            _insert_0001_rows(conn)
            conn.execute(text("UPDATE audit_events SET actor = 'x'"))
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_db_upgrade_command_and_daemon_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon.app import Radflag
    from daemon.settings import load_settings

    db_file = tmp_path / "radflag.db"
    cfg = tmp_path / "radflag.toml"
    cfg.write_text(
        f'[database]\nurl = "sqlite:///{db_file}"\nauto_create = false\n'
        f'[storage]\nspool_dir = "{tmp_path / "spool"}"\nresults_dir = "{tmp_path / "results"}"\n'
    )
    settings = load_settings(cfg, environ={})
    engine = make_engine(settings.database.url)
    upgrade(engine, "0001")
    engine.dispose()
    expected = rf"revision 0001, this radflag expects {head_revision()}"
    with pytest.raises(SchemaMismatch, match=expected):
        Radflag(settings, models=[])
    assert main(["db", "upgrade", "--config", str(cfg)]) == 0
    assert f"0001 -> {head_revision()}" in capsys.readouterr().out
    engine = make_engine(settings.database.url)
    try:
        assert ensure_schema(engine, create_if_empty=False) == head_revision()
    finally:
        engine.dispose()
