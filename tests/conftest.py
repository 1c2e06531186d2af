"""Shared pytest fixtures for radflag's test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RADFLAG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_shared() -> bool:
    """Return True when missing shared data must fail the run instead of skipping it."""
    return os.environ.get("RADFLAG_REQUIRE_SHARED", "") not in ("", "0")


def shared_path(*parts: str) -> Path:
    """Return a path under ``../shared/data``; skip (or fail under RADFLAG_REQUIRE_SHARED=1).

    Parameters
    ----------
    *parts
        Path components below the shared data folder.
    """
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        msg = f"shared data not available: {path}"
        if require_shared():
            pytest.fail(msg + " (RADFLAG_REQUIRE_SHARED=1)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ``../shared/data`` folder (skips or fails when absent)."""
    return shared_path()


POSTGRES_ADMIN_URL = os.environ.get(
    "RADFLAG_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_reachable() -> str | None:
    """Return None when the test PostgreSQL server answers, else the reason it does not."""
    try:
        import psycopg

        dsn = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """Admin URL of the PostgreSQL server at 127.0.0.1:5432 (skip/fail when unreachable)."""
    reason = _postgres_reachable()
    if reason is not None:
        msg = f"PostgreSQL at 127.0.0.1:5432 not reachable ({reason})"
        if require_shared():
            pytest.fail(msg + " (RADFLAG_REQUIRE_SHARED=1)")
        pytest.skip(msg)
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> object:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    import uuid

    import psycopg

    name = f"radflag_test_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = postgres_server.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'radflag.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A radflag schema on :func:`db_url`'s database (disposed afterwards)."""
    from db.engine import make_engine
    from db.schema import ensure_schema

    eng = make_engine(db_url)
    ensure_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture(autouse=True)
def _no_audit_process_left_over() -> Iterator[None]:
    """Each test starts with no process named in audit rows (an in-process app sets one)."""
    from db.audit import set_audit_process

    set_audit_process(None)
    yield
    set_audit_process(None)
