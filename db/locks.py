"""Cluster-wide mutual exclusion for scheduled jobs: PostgreSQL advisory locks.

A job that must run once per cluster at a time (study completion, lease expiry, reclaim of
dead processes, retention) runs only in the process that obtains the job's advisory lock
(``pg_try_advisory_lock``, PostgreSQL docs 13.3.5); the others skip this round. The lock is a
session lock held on a dedicated connection for the duration of the job and released after,
or by the server when the connection dies with its process. SQLite serves one host only: the
lock is always granted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text


def advisory_key(name: str) -> int:
    """Return the signed 64-bit advisory-lock key of a job name (stable across processes)."""
    digest = hashlib.sha256(f"radflag:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def cluster_singleton(engine: Engine, name: str) -> Iterator[bool]:
    """Try to take the cluster-wide lock ``name``; yield whether this process holds it.

    Examples
    --------
    >>> with cluster_singleton(engine, "complete_studies") as mine:  # doctest: +SKIP
    ...     if mine:
    ...         run_the_job()
    """
    if engine.dialect.name != "postgresql":
        yield True
        return
    key = advisory_key(name)
    with engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
