"""Issue 14, problems 4, 5, 6 and 8 through the real ``radflag`` command on a real database.

The database is made by ``radflag db upgrade`` from one working directory, filled with the
same rows the daemon writes, and read by the admin commands run from ANOTHER directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from daemon.cli import build_parser, main
from db.audit import AuditEventType, audit
from db.engine import make_engine, make_session_factory
from db.models import Study
from tests.admin.conftest import RADFLAG, base_sections, clean_env, free_port, radflag, write_toml
from tests.db.conftest import ResultSpec, add_study

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
# 64 characters: the longest a UID may be (PS3.5 9.1); the old table cut it to 44.
LONG_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"
NEG_UID = "1.2.826.0.1.3680043.8.498.2"
NA_UID = "1.2.826.0.1.3680043.8.498.3"
FAILED_UID = "1.2.826.0.1.3680043.8.498.4"


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """(config file, another working directory) with an upgraded, filled database."""
    cfg = write_toml(tmp_path / "conf" / "radflag.toml", base_sections(free_port()))
    (tmp_path / "conf" / "data").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    assert main(["db", "upgrade", "--config", str(cfg)]) == 0
    engine = make_engine(f"sqlite:///{tmp_path / 'conf' / 'data' / 'radflag.db'}")
    sessions = make_session_factory(engine)
    kw = {"quiet_s": 1.0, "classify_s": 2.0, "deliver_s": 1.0}
    add_study(
        sessions,
        LONG_UID,
        state="DONE",
        received_at=T0,
        **kw,
        results=(ResultSpec(probability=0.9137, positive=True),),
    )
    add_study(
        sessions,
        NEG_UID,
        state="DONE",
        received_at=T0 + timedelta(minutes=1),
        quiet_s=1.0,
        classify_s=2.0,
        results=(ResultSpec(probability=0.0004, positive=False),),
    )
    add_study(
        sessions, NA_UID, state="NOT_APPLICABLE", received_at=T0 + timedelta(minutes=2), quiet_s=1.0
    )
    add_study(
        sessions,
        FAILED_UID,
        state="FAILED",
        received_at=T0 + timedelta(minutes=3),
        quiet_s=1.0,
        failure_reason="cannot decode pixel data: truncated",
    )
    with sessions.begin() as s:
        for st in s.scalars(select(Study)).all():
            st.accession_number = f"ACC-{st.study_instance_uid[-1]}"
            st.study_date = "20261120"
        na = s.scalars(select(Study).where(Study.study_instance_uid == NA_UID)).one()
        audit(
            s,
            AuditEventType.STUDY_NOT_APPLICABLE,
            actor="worker:w",
            study=na,
            detail={
                "reasons": {
                    "unreadable": {},
                    "pneumonia": {
                        "selected": [],
                        "excluded": {"a": "not_human", "b": "view_not_frontal"},
                    },
                }
            },
        )
    engine.dispose()
    return cfg, other


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``radflag ARGS`` in this process (the console script's own ``main``)."""
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _table(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines()[1:]:
        cells = [c for c in line.split("  ") if c.strip()]
        if cells and cells[0].startswith("1."):
            rows[cells[0].strip()] = [c.strip() for c in cells]
    return rows


def test_studies_table_is_actionable_and_config_is_found_from_anywhere(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, other = setup
    # --config before and after the subcommand, and RADFLAG_CONFIG, from another directory.
    before = radflag("--config", str(cfg), "studies", cwd=other)
    after = radflag("studies", "--config", str(cfg), cwd=other)
    via_env = radflag("studies", cwd=other, env=clean_env(RADFLAG_CONFIG=str(cfg)))
    for done in (before, after, via_env):
        assert done.returncode == 0, done.stderr
    assert before.stdout == after.stdout == via_env.stdout
    assert list(other.iterdir()) == []  # nothing created in the working directory

    out = before.stdout  # not a terminal: --wide, one line per study
    header = out.splitlines()[0]
    for col in (
        "STUDY INSTANCE UID",
        "ACCESSION",
        "STUDY DATE",
        "FINDING",
        "PROB",
        "THRESH",
        "DELIVERED",
        "REASON",
    ):
        assert col in header
    rows = _table(out)
    assert set(rows) == {LONG_UID, NEG_UID, NA_UID, FAILED_UID}  # full 64-character UID
    pos, neg = rows[LONG_UID], rows[NEG_UID]
    assert pos[1:4] == ["ACC-8", "2026-11-20", "DONE"]
    assert pos[4] == "PRESENT Pneumonia" and pos[5] == "0.914" and pos[6] == "0.50"
    assert pos[7] == "1/1"
    assert neg[4] == "ABSENT Pneumonia" and neg[5] == "0.000"
    assert neg[7] == "no destination"  # DONE, but nothing was sent anywhere
    assert "not_human" in rows[NA_UID][-1] and "view_not_frontal" in rows[NA_UID][-1]
    assert "cannot decode pixel data" in rows[FAILED_UID][-1]
    assert "Pneumonia" not in " ".join(rows[NA_UID])

    # The UID as printed pastes into `studies show` (in-process from here: same main()).
    monkeypatch.chdir(other)
    rc, out, err = cli(capsys, "studies", "show", LONG_UID, "-c", str(cfg))
    assert rc == 0, err
    assert f"STUDY {LONG_UID}" in out and "PRESENT" in out and "threshold=0.50" in out

    _rc, narrow, _err = cli(capsys, "studies", "--narrow", "-c", str(cfg))
    assert "    reason: cannot decode pixel data: truncated" in narrow

    rc, out, _err = cli(capsys, "studies", "find", "--accession", "ACC-2", "-c", str(cfg))
    assert rc == 0 and list(_table(out)) == [NEG_UID]
    rc, out, _err = cli(capsys, "studies", "find", "--accession", "NOPE", "-c", str(cfg))
    assert rc == 1 and "(no study)" in out


def test_stats_names_the_finding(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, _other = setup
    monkeypatch.setenv("RADFLAG_CONFIG", str(cfg))
    rc, out, err = cli(capsys, "stats", "--all")
    assert rc == 0, err
    assert "Pneumonia (233604007)" in out


def test_output_piped_to_head_ends_quietly(setup: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, other = setup
    engine = make_engine(f"sqlite:///{cfg.parent / 'data' / 'radflag.db'}")
    with make_session_factory(engine).begin() as s:  # enough rows to overflow a pipe
        s.add_all(
            Study(
                study_instance_uid=f"1.2.826.0.1.3680043.8.498.9.{i}",
                state="RECEIVING",
                first_received_at=T0,
                last_received_at=T0,
                processing_attempts=0,
                updated_at=T0,
            )
            for i in range(700)
        )
    engine.dispose()
    proc = subprocess.Popen(
        [str(RADFLAG), "studies", "--limit", "700", "--config", str(cfg)],
        cwd=other,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert first.startswith(b"STUDY INSTANCE UID")
    assert err == "", err
    assert rc == 141


def test_version_and_every_option_has_help() -> None:
    done = radflag("--version", cwd=Path("/"))
    assert done.returncode == 0 and done.stdout.startswith("radflag ")

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)
            elif action.option_strings and not action.help and action.dest != "help":
                missing.append(f"{parser.prog} {action.option_strings[0]}")

    walk(build_parser())
    known_elsewhere = [m for m in missing if m.startswith("radflag model")]  # issue 10's CLI
    assert sorted(set(missing) - set(known_elsewhere)) == []


def test_reprocess_and_resend_through_the_cli(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, other = setup
    unknown = radflag("studies", "reprocess", "1.2.3.999", "-c", str(cfg), cwd=other)
    assert unknown.returncode == 2 and "no study 1.2.3.999" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    c = str(cfg)
    rc, _out, err = cli(capsys, "studies", "resend", LONG_UID, "-c", c)
    assert rc == 2 and "no destination configured" in err

    rc, _out, err = cli(capsys, "studies", "reprocess", NA_UID, FAILED_UID, "-c", c)
    assert rc == 0, err
    _rc, out, _err = cli(capsys, "studies", "--format", "json", "-c", c)
    states = {r["study_instance_uid"]: r["state"] for r in json.loads(out)}
    assert states[NA_UID] == states[FAILED_UID] == "READY"
    rc, _out, err = cli(capsys, "studies", "reprocess", NA_UID, "-c", c)
    assert rc == 2 and "is READY: it is already queued" in err
    _rc, out, _err = cli(
        capsys, "audit", "--event", "STUDY_REPROCESS_REQUESTED", "--format", "json", "-c", c
    )
    events = json.loads(out)
    assert sorted(e["study_instance_uid"] for e in events) == sorted([NA_UID, FAILED_UID])
    assert {e["actor"] for e in events} == {"cli"}

    # With a destination configured, a study whose result objects were never written is
    # refused with the remedy, and an unknown --to is named.
    dest = base_sections(
        free_port(),
        destinations=[{"name": "pacs2", "ae_title": "PACS2", "host": "127.0.0.1", "port": 104}],
    )
    c2 = str(write_toml(cfg.parent / "with-dest.toml", dest))
    rc, _out, err = cli(capsys, "studies", "resend", NEG_UID, "-c", c2)
    assert rc == 2 and "no stored result object" in err and "reprocess" in err
    rc, _out, err = cli(capsys, "studies", "resend", NEG_UID, "--to", "NOPE", "-c", c2)
    assert rc == 2 and "configured: pacs2 (PACS2)" in err


def test_environment_config_path_that_does_not_exist(tmp_path: Path) -> None:
    done = radflag(
        "studies", cwd=tmp_path, env={**os.environ, "RADFLAG_CONFIG": str(tmp_path / "nope.toml")}
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"radflag: configuration file not found: {tmp_path / 'nope.toml'}"
