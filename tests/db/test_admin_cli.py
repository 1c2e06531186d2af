"""``radflag audit``/``stats``/``studies show``: argument parsing, formats, error paths."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.admin_cli import parse_when
from daemon.cli import main
from db.engine import make_engine
from db.schema import upgrade
from tests.db.conftest import ResultSpec, add_study

NOW = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)


def test_parse_when() -> None:
    assert parse_when("24h", now=NOW) == NOW - timedelta(hours=24)
    assert parse_when("90s", now=NOW) == NOW - timedelta(seconds=90)
    assert parse_when("1.5d", now=NOW) == NOW - timedelta(hours=36)
    assert parse_when("2w", now=NOW) == NOW - timedelta(days=14)
    assert parse_when("now", now=NOW) == NOW
    assert parse_when("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_when("2024-05-01T08:00:00Z") == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert parse_when("2024-05-01T10:00:00+02:00") == datetime(2024, 5, 1, 8, tzinfo=UTC)
    for bad in ("yesterday", "24x", "", "-3h"):
        with pytest.raises(ValueError, match="ISO 8601"):
            parse_when(bad, now=NOW)


def _config(tmp_path: Path, url: str) -> str:
    cfg = tmp_path / "radflag.toml"
    cfg.write_text(f'[database]\nurl = "{url}"\n')
    return str(cfg)


def test_formats_and_filters(db_url: str, sessions, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    t0 = datetime.now(UTC) - timedelta(hours=2)
    add_study(
        sessions,
        "1.1",
        state="DONE",
        received_at=t0,
        quiet_s=30,
        classify_s=1,
        deliver_s=1,
        results=(ResultSpec(),),
    )
    add_study(
        sessions,
        "1.2",
        state="FAILED",
        calling_ae="OTHER",
        received_at=t0,
        quiet_s=30,
        classify_s=1,
        failure_reason="cannot decode pixel data",
    )
    cfg = _config(tmp_path, db_url)

    assert main(["audit", "-c", cfg, "--format", "csv", "--calling-ae", "OTHER"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["study_instance_uid"] for r in rows} == {"1.2"}
    assert json.loads(rows[0]["detail"]) == {}
    assert main(["audit", "-c", cfg, "--format", "json", "--since", "1h"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert (
        main(
            [
                "audit",
                "-c",
                cfg,
                "--format",
                "json",
                "--state",
                "done",
                "--finding",
                "pneumonia",
                "--event",
                "delivery_sent",
            ]
        )
        == 0
    )
    (event,) = json.loads(capsys.readouterr().out)
    assert (event["study_instance_uid"], event["event_type"]) == ("1.1", "DELIVERY_SENT")
    assert main(["audit", "-c", cfg]) == 0
    assert "(4 events)" in capsys.readouterr().out

    assert main(["stats", "-c", cfg, "--format", "json", "--since", "1h"]) == 0
    assert json.loads(capsys.readouterr().out)["studies_in_window"] == 0
    assert main(["stats", "-c", cfg, "--format", "json"]) == 0  # default window: 7 days
    stats = json.loads(capsys.readouterr().out)
    assert stats["studies_in_window"] == 2
    assert stats["failures"] == [{"reason": "cannot decode pixel data", "n_studies": 1}]
    assert main(["stats", "-c", cfg]) == 0
    assert "cannot decode pixel data" in capsys.readouterr().out

    assert main(["studies", "show", "1.2", "-c", cfg]) == 0
    assert "failure: cannot decode pixel data" in capsys.readouterr().out
    assert main(["studies", "show", "9.9", "-c", cfg]) == 1
    assert "no study 9.9" in capsys.readouterr().err
    assert main(["studies", "-c", cfg, "--format", "json"]) == 0  # the list still works
    assert {r["study_instance_uid"] for r in json.loads(capsys.readouterr().out)} == {"1.1", "1.2"}


def test_bad_arguments_exit_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in (
        ["audit", "--event", "NOT_AN_EVENT"],
        ["audit", "--since", "last tuesday"],
        ["audit", "--state", "SLEEPING"],
        ["stats", "--format", "xml"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown event type 'NOT_AN_EVENT'" in err and "STUDY_DONE" in err
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'x.db'}")
    assert main(["audit", "-c", cfg, "--since", "1h", "--until", "2h"]) == 2
    assert "earlier" in capsys.readouterr().err


def test_missing_database_and_old_schema_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    db_file = tmp_path / "radflag.db"
    cfg = _config(tmp_path, f"sqlite:///{db_file}")
    assert main(["audit", "-c", cfg]) == 2
    assert "no radflag database at" in capsys.readouterr().err
    assert not db_file.exists()  # the read-only commands never create a database
    engine = make_engine(f"sqlite:///{db_file}")
    upgrade(engine, "0001")
    engine.dispose()
    assert main(["stats", "-c", cfg]) == 2
    assert "run `radflag db upgrade`" in capsys.readouterr().err
