"""Start-up checks: every failure is one line naming the setting and the cause.

``radflag serve`` runs :func:`preflight` before it builds the daemon (cheap checks first,
the model bundles last) and stops at the first problem with exit status 2. ``radflag check``
runs :func:`run_checks`, which does every check, C-ECHOes each destination (PS3.4 Annex A)
and reports them all.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from daemon.settings import DEFAULT_DATABASE_URL, DestinationSettings, Settings

if TYPE_CHECKING:
    from daemon.models import LoadedModel

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """radflag cannot start; ``str()`` is one line: ``<setting>: <cause>``."""

    def __init__(self, setting: str, cause: str) -> None:
        super().__init__(f"{setting}: {cause}")
        self.setting = setting
        self.cause = cause


def _first_line(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


# -- database ---------------------------------------------------------------------------------
def check_sqlite_folder(url: str, data_dir: Path | None = None) -> None:
    """Check that a SQLite file's folder exists.

    Only radflag's own data folder is created: the embedded default ``./radflag-data/`` and
    ``data_dir`` (the folder holding ``storage.spool_dir``), which radflag creates anyway.

    Raises
    ------
    StartupError
        When the folder is missing (no silent creation of a database somewhere else).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(str(parsed.database)).expanduser()
    own = data_dir is not None and path.parent.resolve() == data_dir.resolve()
    if url == DEFAULT_DATABASE_URL or own:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError("database.url", f"{path.parent}: {exc.strerror}") from None
        return
    if not path.parent.is_dir():
        raise StartupError("database.url", f"folder {path.parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise StartupError("database.url", f"{path} is not writable")
    if not path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise StartupError("database.url", f"cannot create {path}: folder is not writable")


def database_cause(url: str, exc: BaseException) -> str:
    """Say in one line why the database at ``url`` could not be opened."""
    parsed = make_url(url)
    msg = _first_line(exc)
    low = msg.lower()
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    if "connection refused" in low:
        return f"PostgreSQL at {where} refused the connection"
    if "does not exist" in low and "database" in low:
        return f"database {parsed.database!r} does not exist on {where} (create it first)"
    if "timeout" in low or "timed out" in low:
        return f"PostgreSQL at {where} did not answer (timed out)"
    if "readonly" in low or "read-only" in low:
        return f"{parsed.database} is read-only"
    if "unable to open" in low:
        return f"cannot open or create {parsed.database} (read-only folder or no permission)"
    return msg


def open_database(settings: Settings) -> Engine:
    """Open the database, check it answers and its schema (created when empty and allowed).

    Raises
    ------
    StartupError
        Naming ``database.url`` and the cause (refused, missing database, read-only file,
        schema of another version).
    """
    from db.engine import make_engine
    from db.schema import SchemaMismatch, ensure_schema

    url = settings.database.url
    check_sqlite_folder(url, settings.storage.spool_dir.parent)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        ensure_schema(engine, create_if_empty=settings.database.auto_create)
    except SchemaMismatch as exc:
        engine.dispose()
        raise StartupError("database.url", str(exc)) from None
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StartupError("database.url", database_cause(url, exc)) from None
    return engine


# -- folders and ports ------------------------------------------------------------------------
def check_directory(setting: str, directory: Path) -> None:
    """Create ``directory`` if needed and prove a file can be written and fsynced in it.

    Raises
    ------
    StartupError
        Naming ``setting`` and the operating system's reason.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".radflag-check-") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        where = exc.filename or directory
        raise StartupError(setting, f"{where}: {exc.strerror or type(exc).__name__}") from None


def check_port(setting: str, host: str, port: int) -> None:
    """Bind ``host:port`` briefly (port 0 = ephemeral, always fine).

    Raises
    ------
    StartupError
        When the port is in use or the address cannot be bound; the message names the port.
    """
    if port == 0:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            cause = f"port {port} on {host} is already in use by another program"
        elif exc.errno == errno.EACCES:
            cause = f"port {port} on {host}: permission denied (ports below 1024 need root)"
        else:
            cause = f"cannot bind {host}:{port}: {exc.strerror or exc}"
        raise StartupError(setting, cause) from None


def load_bundles(settings: Settings) -> list[LoadedModel]:
    """Load the configured model bundles.

    Raises
    ------
    StartupError
        Naming ``models.bundles`` and the bundle's problem (missing, malformed, bad sha256).
    """
    missing = [p for p in settings.models.bundles if not p.is_dir()]
    if missing:  # said before torch is imported (seconds)
        raise StartupError("models.bundles", f"no model bundle at {missing[0]}")
    from daemon.models import load_models
    from model.bundle import BundleError

    try:
        worker = settings.worker
        return load_models(
            settings.models.bundles, worker.device, worker.batch_size, worker.torch_threads
        )
    except (BundleError, OSError, RuntimeError) as exc:
        raise StartupError("models.bundles", _first_line(exc)) from None


# -- the daemon's preflight -------------------------------------------------------------------
def _cheap_checks(settings: Settings) -> list[tuple[str, Callable[[], object]]]:
    lst, http = settings.listener, settings.http
    checks: list[tuple[str, Callable[[], object]]] = [
        (
            "storage.spool_dir",
            lambda: check_directory("storage.spool_dir", settings.storage.spool_dir),
        ),
        (
            "storage.results_dir",
            lambda: check_directory("storage.results_dir", settings.storage.results_dir),
        ),
        ("database.url", lambda: open_database(settings).dispose()),
        ("listener.port", lambda: check_port("listener.port", lst.host, lst.port)),
    ]
    if http.enabled:
        checks.append(("http.port", lambda: check_port("http.port", http.host, http.port)))
    return checks


def preflight(settings: Settings) -> list[LoadedModel]:
    """Check everything ``radflag serve`` needs, cheapest first; return the loaded models.

    Raises
    ------
    StartupError
        At the first problem.
    """
    for _name, run in _cheap_checks(settings):
        run()
    return load_bundles(settings)


@contextmanager
def startup_step(setting: str) -> Iterator[None]:
    """Turn an ``OSError`` raised while starting a part of the daemon into a StartupError."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(setting, "port already in use by another program") from None
        raise StartupError(setting, exc.strerror or _first_line(exc)) from None


# -- destinations -----------------------------------------------------------------------------
def echo_destination(
    settings: Settings, dest: DestinationSettings, timeout_s: float = 5.0
) -> str | None:
    """C-ECHO a destination; return None when it answers, else the cause (one line).

    ``to_sender`` destinations without a fixed address cannot be echoed: None.
    """
    from dicom_io.echo import echo

    if dest.to_sender and not (dest.ae_title and dest.host):
        return None
    out = echo(
        dest.host,
        dest.port,
        dest.ae_title,
        calling_ae=settings.delivery.calling_ae_title,
        timeout_s=timeout_s,
    )
    return None if out.ok else out.detail


def delivery_warning(settings: Settings, timeout_s: float = 5.0) -> str | None:
    """Return the warning ``serve`` logs about destinations, or None when one answers.

    No destination configured, or every destination failing its C-ECHO, means results are
    produced but reach no one.
    """
    if not settings.destinations:
        return (
            "no destination configured: results are stored but sent nowhere "
            "(add a [[destinations]] entry)"
        )
    causes = [(d.name, echo_destination(settings, d, timeout_s)) for d in settings.destinations]
    if any(c is None for _n, c in causes):
        return None
    return "every destination is unreachable: " + "; ".join(f"{n}: {c}" for n, c in causes)


# -- radflag check ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckLine:
    """One line of the ``radflag check`` report: ``OK``, ``WARN`` or ``FAIL``."""

    level: str
    what: str
    detail: str


def _run(what: str, fn: Callable[[], object], ok_detail: str) -> CheckLine:
    try:
        fn()
    except StartupError as exc:
        return CheckLine("FAIL", what, exc.cause)
    return CheckLine("OK", what, ok_detail)


def run_checks(settings: Settings, source: str) -> list[CheckLine]:
    """Validate, open the database, load the bundles, bind the ports, echo the destinations."""
    lines = [CheckLine("OK", "configuration", source)]
    for name, fn in _cheap_checks(settings):
        lines.append(_run(name, fn, _ok_detail(settings, name)))
    try:
        models = load_bundles(settings)
        lines.append(
            CheckLine(
                "OK",
                "models.bundles",
                ", ".join(f"{m.bundle.card.name} {m.bundle.card.version}" for m in models),
            )
        )
    except StartupError as exc:
        lines.append(CheckLine("FAIL", "models.bundles", exc.cause))
    if not settings.destinations:
        lines.append(
            CheckLine("WARN", "destinations", "none configured: results will be sent nowhere")
        )
    for dest in settings.destinations:
        cause = echo_destination(settings, dest)
        what = f"destination {dest.name}"
        if dest.to_sender and not dest.host:
            lines.append(CheckLine("OK", what, "results go back to each study's sender"))
        elif cause is None:
            lines.append(CheckLine("OK", what, f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}"))
        else:
            lines.append(CheckLine("WARN", what, cause))
    return lines


def _ok_detail(settings: Settings, name: str) -> str:
    return {
        "storage.spool_dir": str(settings.storage.spool_dir),
        "storage.results_dir": str(settings.storage.results_dir),
        "database.url": make_url(settings.database.url).render_as_string(hide_password=True),
        "listener.port": f"{settings.listener.host}:{settings.listener.port} is free",
        "http.port": f"{settings.http.host}:{settings.http.port} is free",
    }[name]


def check_exit_status(lines: list[CheckLine]) -> int:
    """0 when all is well, 1 with warnings only, 2 when radflag would not start."""
    levels = {line.level for line in lines}
    return 2 if "FAIL" in levels else 1 if "WARN" in levels else 0
