"""The database's clock: lease expiries and heartbeats are compared on one clock.

Several radflag processes on several hosts share one database; their own clocks may drift
apart, so every lease expiry and liveness check is computed from the database server's time
(``SELECT CURRENT_TIMESTAMP`` / ``clock_timestamp()`` on PostgreSQL). SQLite runs in-process,
so its clock *is* the host's: UTC now, read once the transaction holds SQLite's write lock
(``BEGIN IMMEDIATE``), so that times follow the order in which transactions commit.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import utcnow


def db_now(session: Session) -> datetime:
    """Return the database server's current time as an aware UTC datetime.

    On PostgreSQL ``clock_timestamp()`` is used (not ``now()``, which is frozen at the start
    of the transaction), so a long transaction still sees time pass.

    Parameters
    ----------
    session
        An open session; on PostgreSQL the query runs in its transaction.
    """
    if session.get_bind().dialect.name != "postgresql":
        session.connection()  # begin (and wait for the write lock) before reading the clock
        return utcnow()
    value = session.execute(text("SELECT clock_timestamp()")).scalar_one()
    if not isinstance(value, datetime):
        raise TypeError(f"clock_timestamp() returned {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
