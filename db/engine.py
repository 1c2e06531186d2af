"""Engine and session construction for SQLite (default) and PostgreSQL.

SQLite runs in WAL mode with ``synchronous=FULL`` (an acknowledged instance row survives a
power cut), a busy timeout, foreign keys on, and ``BEGIN IMMEDIATE`` transactions so that
concurrent writers (listener threads, the worker, the scheduler) queue instead of failing on a
lock upgrade.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000

POSTGRESQL_CONNECT_ARGS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
}
"""libpq parameters: a PostgreSQL server that silently stops answering (packets dropped)
fails the statement within ~20 s instead of hanging a C-STORE until the sender's timeout."""


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create an engine for ``url`` with radflag's connection settings.

    Parameters
    ----------
    url
        SQLAlchemy URL: ``sqlite:///path/radflag.db`` or ``postgresql+psycopg://…``.
    echo
        Log every SQL statement (debugging only).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            echo=echo,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        _configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(
        parsed, echo=echo, pool_pre_ping=True, connect_args=dict(POSTGRESQL_CONNECT_ARGS)
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, emit BEGIN (pysqlite's own handling defers it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the write lock up front (no lock-upgrade failures under contention);
        # read-only sessions (make_read_session_factory) begin DEFERRED and never block writers.
        mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory whose objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory for read-only work (admin queries, dashboards).

    On SQLite its transactions begin ``DEFERRED`` (a WAL snapshot that never blocks the
    daemon's writers); elsewhere it is the same as :func:`make_session_factory`.
    """
    bound = (
        engine.execution_options(sqlite_begin="DEFERRED")
        if engine.dialect.name == "sqlite"
        else engine
    )
    return sessionmaker(bind=bound, expire_on_commit=False)


def is_postgresql(engine: Engine) -> bool:
    """Return True when ``engine`` talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"
