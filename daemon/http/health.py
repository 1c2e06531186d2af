"""Readiness checks of ``/readyz``: database reachable, model loaded, spool writable.

Each check is a plain function returning a :class:`Check`; none raises. ``/healthz``
(liveness) needs none of them: it only says the process answers HTTP and is not stopping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError


@dataclass(frozen=True)
class Check:
    """The outcome of one readiness check; ``detail`` says why when it failed."""

    name: str
    ok: bool
    detail: str


def check_database(engine: Engine) -> Check:
    """Run ``SELECT 1`` on a pooled connection."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return Check("database", False, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return Check("database", True, engine.dialect.name)


def check_models(identities: Sequence[str]) -> Check:
    """At least one model is loaded (``identities``: ``"name version"`` of each)."""
    if not identities:
        return Check("models", False, "no model loaded")
    return Check("models", True, ", ".join(identities))


def check_writable(name: str, directory: Path, min_free_bytes: int = 0) -> Check:
    """``directory`` exists, a file can be written and fsynced in it, and space is left.

    Parameters
    ----------
    name
        Name of the check in the answer.
    directory
        Folder to probe (a temporary file is created and removed).
    min_free_bytes
        Free space below which the check fails (the listener refuses C-STOREs then).
    """
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".readyz-", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        return Check(name, False, f"{directory}: {exc.strerror or type(exc).__name__}")
    if free < min_free_bytes:
        return Check(
            name, False, f"{directory}: {free // 2**20} MiB free, below {min_free_bytes // 2**20}"
        )
    return Check(name, True, f"{free // 2**20} MiB free")


def check_destinations(warnings: Sequence[str]) -> Check:
    """Report the daemon's delivery warnings; always ``ok`` (a down PACS is no reason to restart).

    ``detail`` says ``results are sent`` or the warning (no destination, none reachable).
    """
    if warnings:
        return Check("destinations", True, "WARNING: " + "; ".join(warnings))
    return Check("destinations", True, "results are sent to the configured destinations")
