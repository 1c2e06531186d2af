"""The ``radflag`` command line: ``serve``, ``check``, ``studies``, ``db upgrade``, ``model …``.

``--config FILE`` (or ``$RADFLAG_CONFIG``) is accepted before or after any subcommand; every
failure a person must fix is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from daemon.admin_cli import AdminError
from daemon.settings import CONFIG_ENV, Settings, SettingsError, config_path, load_settings
from daemon.startup import StartupError
from db.schema import SchemaMismatch


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


def _cmd_serve(args: argparse.Namespace) -> int:
    from daemon.logsetup import configure_logging
    from daemon.proc import install_log_filter, serve_identity
    from daemon.startup import preflight, startup_step

    settings = _settings(args)
    configure_logging(settings.logging.level, settings.logging.format)
    identity = serve_identity(settings, args.roles)
    install_log_filter(identity.id, ",".join(identity.roles))  # start-up lines name it too
    models = preflight(settings)  # cheap checks first, before torch and the web stack load
    from daemon.app import Radflag
    from daemon.http.server import HttpServerError

    app = Radflag(settings, models=models, roles=args.roles, identity=identity)
    try:
        with startup_step("listener.port"):
            app.run_until_signal()
    except HttpServerError as exc:
        raise StartupError("http.port", str(exc).splitlines()[0]) from None
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from daemon.startup import check_exit_status, run_checks

    source = str(Path(args.config).resolve()) if args.config else "embedded defaults"
    settings = _settings(args)
    lines = run_checks(settings, source)
    width = max(len(line.what) for line in lines)
    for line in lines:
        print(f"{line.level:<4}  {line.what:<{width}}  {line.detail}")
    status = check_exit_status(lines)
    verdict = {
        0: "radflag can start and deliver",
        1: "radflag can start; see the warnings",
        2: "radflag would not start; fix the FAIL lines",
    }[status]
    print(verdict)
    return status


def _roles(value: str) -> tuple[str, ...]:
    from db.cluster import ROLES

    roles = tuple(r.strip() for r in value.split(",") if r.strip())
    unknown = sorted(set(roles) - set(ROLES))
    if not roles or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown role(s) {', '.join(unknown) or '(none)'}; choose from {','.join(ROLES)}"
        )
    return roles


def _cmd_cluster(args: argparse.Namespace) -> int:
    from daemon.admin_cli import open_sessions
    from db.cluster import list_processes

    settings = _settings(args)
    rows = list_processes(
        open_sessions(args.config), lease_s=settings.worker.lease_s, include_stopped=args.all
    )
    if args.format == "json":
        print(json.dumps([_jsonable(vars(r)) for r in rows], indent=2))
        return 0
    print(f"{'PROCESS':<36} {'ROLES':<32} {'STARTED (UTC)':<19} {'BEAT':>6} {'STATE':<8} HOLDS")
    for r in rows:
        state = "alive" if r.alive else (r.stop_reason or "silent")[:8]
        print(
            f"{r.id[:36]:<36} {r.roles[:32]:<32} {r.started_at:%Y-%m-%d %H:%M:%S} "
            f"{r.heartbeat_age_s:>5.0f}s {state:<8} {len(r.studies_held)} studies"
        )
        for uid in r.studies_held:
            print(f"    {uid}")
    return 0


def _jsonable(row: dict[str, object]) -> dict[str, object]:
    return {
        k: (v.isoformat() if hasattr(v, "isoformat") else list(v) if isinstance(v, tuple) else v)
        for k, v in row.items()
    }


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from daemon.startup import check_sqlite_folder
    from db.engine import make_engine
    from db.schema import current_revision, head_revision, upgrade

    settings = _settings(args)
    check_sqlite_folder(settings.database.url, settings.storage.spool_dir.parent)
    engine = make_engine(settings.database.url)
    before = current_revision(engine)
    upgrade(engine)
    print(f"database schema: {before or 'empty'} -> {head_revision()}")
    return 0


def _version() -> str:
    try:
        return version("radflag")
    except PackageNotFoundError:
        return "unknown"


def _config_everywhere(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command ``--config``; a value after the subcommand wins, else before."""
    for action in parser._actions:
        if action.dest == "config" and parser.prog != "radflag":
            action.default = argparse.SUPPRESS
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any(a.dest == "config" for a in child._actions):
                    child.add_argument(
                        "--config",
                        "-c",
                        metavar="FILE",
                        default=argparse.SUPPRESS,
                        help=f"TOML configuration (default: ${CONFIG_ENV} or embedded defaults)",
                    )
                _config_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``radflag`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="radflag",
        description="DICOM AI gateway for chest imaging. "
        f"The configuration is --config FILE, else ${CONFIG_ENV}, else embedded defaults.",
    )
    parser.add_argument("--version", action="version", version=f"radflag {_version()}")
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=None,
        help=f"TOML configuration (default: ${CONFIG_ENV} or embedded defaults)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the DICOM listener, worker and scheduler")
    serve.add_argument(
        "--roles",
        type=_roles,
        default="listener,worker,sender,scheduler",
        help="comma-separated roles of this process (default: all); each is safe N times",
    )
    serve.set_defaults(func=_cmd_serve)

    cluster = sub.add_parser("cluster", help="live processes: roles, heartbeats, studies they hold")
    cluster.add_argument("--all", action="store_true", help="include stopped and dead processes")
    cluster.add_argument(
        "--format", choices=["table", "json"], default="table", help="output format (table)"
    )
    cluster.set_defaults(func=_cmd_cluster)

    check = sub.add_parser(
        "check",
        help="check the configuration, database, bundles, ports and destinations, then exit",
        description="Validate the configuration, open the database, load the model bundles, "
        "bind the ports and C-ECHO every destination. Exit 0 when all is well, 1 with "
        "warnings (e.g. a destination does not answer), 2 when radflag would not start.",
    )
    check.set_defaults(func=_cmd_check)

    studies = sub.add_parser(
        "studies",
        help="list studies with state, finding and delivery",
        description="The most recent studies. Subcommands: show, find, reprocess, resend.",
    )
    studies.add_argument("--limit", type=int, default=50, help="most studies shown (50)")
    from daemon.studies_cli import add_table_options, cmd_list
    from daemon.studies_cli import register as register_studies

    add_table_options(studies)
    studies.set_defaults(func=cmd_list)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply schema migrations")
    up.set_defaults(func=_cmd_db_upgrade)

    from daemon.admin_cli import register as register_admin
    from model.cli import register as register_model

    register_studies(register_admin(sub, studies=studies))
    from daemon.renditions import read_through_dicom

    register_model(sub, rendition_reader=read_through_dicom)
    from daemon.outbox_cli import register as register_outbox

    register_outbox(sub)
    _config_everywhere(parser)
    return parser


def _quiet_broken_pipe() -> int:
    """End quietly when the reader went away (``radflag studies | head``), as ``cat`` does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a command ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``radflag`` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = config_path(getattr(args, "config", None))
    args.config = str(chosen) if chosen else None
    try:
        status = int(args.func(args))
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (SettingsError, AdminError, SchemaMismatch, StartupError) as exc:
        print(f"radflag: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
