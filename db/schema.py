"""Schema versioning with Alembic: upgrade, and refuse to run on a schema we do not know."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class SchemaMismatch(RuntimeError):
    """The database's schema revision is not the one this radflag version expects."""


def alembic_config(engine: Engine) -> Config:
    """Return an Alembic config that migrates ``engine``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """Return the newest migration revision this code knows."""
    script = ScriptDirectory.from_config(alembic_config_for_scripts())
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("no Alembic migrations found")
    return head


def alembic_config_for_scripts() -> Config:
    """Return an Alembic config that only reads the migration scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def current_revision(engine: Engine) -> str | None:
    """Return the database's Alembic revision, or None for a database without radflag tables."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (``radflag db upgrade``)."""
    command.upgrade(alembic_config(engine), revision)


def ensure_schema(engine: Engine, *, create_if_empty: bool = True) -> str:
    """Check that the database is at the schema this code expects.

    An empty database is migrated to the head when ``create_if_empty`` (the embedded SQLite
    default must just work). A database at an older known revision, at an unknown revision, or
    with tables but no revision is refused with a message that says what to do.

    Returns
    -------
    str
        The revision the database is at.

    Raises
    ------
    SchemaMismatch
        When the schema is not the expected one.
    """
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return head
    if current is None:
        tables = set(inspect(engine).get_table_names())
        if tables & {"studies", "instances", "audit_events"}:
            raise SchemaMismatch(
                "the database has radflag-like tables but no schema revision; refusing to touch it"
            )
        if not create_if_empty:
            raise SchemaMismatch("the database is empty: run `radflag db upgrade`")
        upgrade(engine)
        return head
    script = ScriptDirectory.from_config(alembic_config_for_scripts())
    known = {rev.revision for rev in script.walk_revisions()}
    if current in known:
        raise SchemaMismatch(
            f"the database schema is at revision {current}, this radflag expects {head}: "
            "run `radflag db upgrade`"
        )
    raise SchemaMismatch(
        f"the database schema revision {current} is unknown to this radflag (expects {head}); "
        "it was probably written by a newer version"
    )
