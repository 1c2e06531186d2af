"""The ``radflag`` command line: ``serve``, ``studies``, ``db upgrade``, ``model …``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from daemon.admin_cli import AdminError
from daemon.settings import Settings, SettingsError, load_settings
from db.schema import SchemaMismatch


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


def _cmd_serve(args: argparse.Namespace) -> int:
    from daemon.app import Radflag
    from daemon.logsetup import configure_logging

    settings = _settings(args)
    configure_logging(settings.logging.level, settings.logging.format)
    app = Radflag(settings)
    app.run_until_signal()
    return 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from db.engine import make_engine
    from db.schema import current_revision, head_revision, upgrade

    settings = _settings(args)
    engine = make_engine(settings.database.url)
    before = current_revision(engine)
    upgrade(engine)
    print(f"database schema: {before or 'empty'} -> {head_revision()}")
    return 0


def _cmd_studies(args: argparse.Namespace) -> int:
    from daemon.admin_cli import open_sessions
    from db.queries import list_studies

    rows = list_studies(open_sessions(args.config), limit=args.limit)
    if args.format == "json":
        print(
            json.dumps(
                [
                    {
                        k: (v.isoformat() if hasattr(v, "isoformat") else v)
                        for k, v in vars(r).items()
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    header = (
        f"{'STUDY INSTANCE UID':<44} {'STATE':<16} {'FINDING':<12} {'PROB':>6} {'FLAG':<4} "
        f"{'IMG':>3} {'RECEIVED (UTC)':<19} {'FINISHED (UTC)':<19}"
    )
    print(header)
    for r in rows:
        prob = f"{r.probability:.3f}" if r.probability is not None else "-"
        flag = "POS" if r.positive else ("neg" if r.positive is not None else "-")
        print(
            f"{r.study_instance_uid[:44]:<44} {r.state:<16} {(r.finding or '-')[:12]:<12} "
            f"{prob:>6} {flag:<4} {r.n_instances:>3} "
            f"{r.first_received_at:%Y-%m-%d %H:%M:%S} "
            f"{(f'{r.finished_at:%Y-%m-%d %H:%M:%S}' if r.finished_at else '-'):<19}"
        )
        if r.failure_reason:
            print(f"    reason: {r.failure_reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the ``radflag`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="radflag", description="DICOM AI gateway for chest imaging."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", "-c", metavar="FILE", help="TOML configuration (default: embedded defaults)"
        )
        return p

    serve = with_config(
        sub.add_parser("serve", help="run the DICOM listener, worker and scheduler")
    )
    serve.set_defaults(func=_cmd_serve)

    studies = with_config(sub.add_parser("studies", help="list studies with state and result"))
    studies.add_argument("--limit", type=int, default=50)
    studies.add_argument("--format", choices=["table", "json"], default="table")
    studies.set_defaults(func=_cmd_studies)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = with_config(db_sub.add_parser("upgrade", help="apply schema migrations"))
    up.set_defaults(func=_cmd_db_upgrade)

    from daemon.admin_cli import register as register_admin
    from model.cli import register as register_model

    register_admin(sub, studies=studies)
    from daemon.renditions import read_through_dicom

    register_model(sub, rendition_reader=read_through_dicom)
    from daemon.outbox_cli import register as register_outbox

    register_outbox(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``radflag`` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (SettingsError, AdminError, SchemaMismatch) as exc:
        print(f"radflag: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
