"""Issue 14, problem 3 (and 1, 6): start-up failures are one line naming the setting and the
cause, exit status 2, quickly; ``radflag check`` reports everything at once.

Each case mutates a working configuration in one place and runs the real ``radflag serve``.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.admin.conftest import base_sections, free_port, radflag, write_toml


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory that is not the configuration's folder."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    return d


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 with a listening socket on it (another program)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def _one_line_exit_2(done: Any, *expected: str) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and "Traceback" not in done.stdout, err
    lines = [ln for ln in err.splitlines() if ln.startswith("radflag: ")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _serve(tmp_path: Path, cwd: Path, **overrides: Any) -> Any:
    cfg = write_toml(tmp_path / "conf" / "radflag.toml", base_sections(free_port(), **overrides))
    started = time.monotonic()
    done = radflag("serve", "--config", str(cfg), cwd=cwd)
    done.elapsed_s = time.monotonic() - started  # type: ignore[attr-defined]
    return done


CASES: dict[str, tuple[Callable[[Path, int], dict[str, Any]], tuple[str, ...]]] = {
    "missing bundle": (
        lambda d, p: {"models": {"bundles": ["no-such-bundle"]}},
        ("models.bundles: no model bundle at ", "conf/no-such-bundle"),
    ),
    "spool dir under a file": (
        lambda d, p: {"storage": {"spool_dir": "a-file/spool"}},
        ("storage.spool_dir: ", "a-file", "Not a directory"),
    ),
    "sqlite folder missing": (
        lambda d, p: {"database": {"url": "sqlite:///no/such/dir/radflag.db"}},
        ("database.url: folder ", "conf/no/such/dir does not exist"),
    ),
    "sqlite in a read-only folder": (
        lambda d, p: {"database": {"url": "sqlite:////proc/radflag.db"}},
        ("database.url: cannot open or create /proc/radflag.db",),
    ),
    "spool dir in a read-only folder": (
        lambda d, p: {"storage": {"spool_dir": "/proc/radflag-spool"}},
        ("storage.spool_dir: /proc/radflag-spool: ",),
    ),
    "postgresql refused": (
        lambda d, p: {"database": {"url": f"postgresql+psycopg://radflag@127.0.0.1:{p}/radflag"}},
        ("database.url: PostgreSQL at 127.0.0.1:", "refused the connection"),
    ),
    "postgresql without driver": (
        lambda d, p: {"database": {"url": "postgresql://radflag@127.0.0.1/radflag"}},
        ("database.url: unsupported scheme 'postgresql'", "postgresql+psycopg://"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_start_up_failure_is_one_line_naming_the_setting(
    case: str, tmp_path: Path, elsewhere: Path
) -> None:
    make, expected = CASES[case]
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a-file").write_text("not a folder")
    done = _serve(tmp_path, elsewhere, **make(tmp_path, free_port()))
    _one_line_exit_2(done, *expected)
    assert done.elapsed_s < 60
    # Nothing was created in the working directory (no silent database "somewhere else").
    assert list(elsewhere.iterdir()) == []


@pytest.mark.postgres
def test_missing_postgresql_database_is_named(
    postgres_server: str, tmp_path: Path, elsewhere: Path
) -> None:
    name = f"radflag_absent_{uuid.uuid4().hex[:8]}"
    base = postgres_server.rsplit("/", 1)[0]
    done = _serve(tmp_path, elsewhere, database={"url": f"{base}/{name}"})
    _one_line_exit_2(done, f"database.url: database '{name}' does not exist", "create it first")


def test_dicom_port_in_use_is_named(tmp_path: Path, elsewhere: Path, busy_port: int) -> None:
    cfg = write_toml(tmp_path / "conf" / "radflag.toml", base_sections(busy_port))
    done = radflag("serve", "--config", str(cfg), cwd=elsewhere)
    _one_line_exit_2(done, "listener.port: ", f"port {busy_port} on 127.0.0.1 is already in use")


def test_http_port_in_use_is_named(tmp_path: Path, elsewhere: Path, busy_port: int) -> None:
    sections = base_sections(
        free_port(),
        http={"enabled": True, "host": "127.0.0.1", "port": busy_port, "token": "t" * 20},
    )
    cfg = write_toml(tmp_path / "conf" / "radflag.toml", sections)
    done = radflag("serve", "--config", str(cfg), cwd=elsewhere)
    _one_line_exit_2(done, "http.port: ", f"port {busy_port} on 127.0.0.1 is already in use")


def test_check_reports_every_problem_and_warns_about_destinations(
    tmp_path: Path, elsewhere: Path, busy_port: int
) -> None:
    closed = free_port()
    sections = base_sections(
        busy_port,
        database={"url": "sqlite:///missing-folder/radflag.db"},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": closed}],
    )
    cfg = write_toml(tmp_path / "conf" / "radflag.toml", sections)
    done = radflag("check", "--config", str(cfg), cwd=elsewhere)
    assert done.returncode == 2, done.stdout + done.stderr
    report = {
        ln.split()[1]: ln for ln in done.stdout.splitlines() if ln[:4] in ("OK  ", "FAIL", "WARN")
    }
    assert report["database.url"].startswith("FAIL") and "missing-folder" in report["database.url"]
    assert report["listener.port"].startswith("FAIL") and str(busy_port) in report["listener.port"]
    assert report["storage.spool_dir"].startswith("OK")
    assert str(tmp_path / "conf" / "data" / "spool") in report["storage.spool_dir"]
    assert report["models.bundles"].startswith("OK")
    dest = next(ln for ln in done.stdout.splitlines() if "destination pacs" in ln)
    assert dest.startswith("WARN") and f"connection refused by 127.0.0.1:{closed}" in dest
    assert "would not start" in done.stdout


def test_check_of_a_good_configuration_without_destination_exits_1(
    tmp_path: Path, elsewhere: Path
) -> None:
    cfg = write_toml(tmp_path / "conf" / "radflag.toml", base_sections(free_port()))
    done = radflag(
        "check", cwd=elsewhere, env={**__import__("os").environ, "RADFLAG_CONFIG": str(cfg)}
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "WARN  destinations" in done.stdout and "sent nowhere" in done.stdout
    assert "FAIL" not in done.stdout
    assert (tmp_path / "conf" / "data" / "radflag.db").is_file()
