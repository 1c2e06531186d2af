"""``radflag studies [list]|find|reprocess|resend``: tables a person can act on, and actions.

The table shows full Study Instance UIDs (paste them into ``studies show``), Accession Number
and Study Date to match the RIS, the finding as PRESENT/ABSENT, the rounded probability and
threshold, what was DELIVERED, and why a study ended NOT_APPLICABLE/FAILED. ``--wide`` (the
default when the output is not a terminal) puts everything on one line per study.

Examples
--------
``radflag studies --limit 20``
``radflag studies find --accession ACC123``
``radflag studies find --patient-id 12345``   (hashed with the configured key, as at ingest)
``radflag studies reprocess 1.2.3.4 --config /etc/radflag/radflag.toml``
``radflag studies reprocess --since 24h``
``radflag studies resend 1.2.3.4 --to PACS``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from daemon.admin_cli import AdminError, open_sessions, parse_when
from daemon.settings import Settings, load_settings
from db.queries import StudyRow


# -- table ------------------------------------------------------------------------------------
def _date(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "-"


def _time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def finding_text(row: StudyRow) -> str:
    """``PRESENT Pneumonia`` / ``ABSENT Pneumonia`` / ``-``: the decision before the name."""
    if row.decision is None:
        return "-"
    return f"{row.decision} {row.finding or ''}".strip()


def _cells(row: StudyRow, wide: bool) -> list[str]:
    cells = [
        row.study_instance_uid,
        row.accession_number or "-",
        _date(row.study_date),
        row.state,
        finding_text(row),
        "-" if row.probability is None else f"{row.probability:.3f}",
        "-" if row.threshold is None else f"{row.threshold:.2f}",
        row.delivered,
        _time(row.last_received_at),
    ]
    if wide:
        cells += [
            row.calling_ae or "-",
            str(row.n_instances),
            row.model or "-",
            _time(row.finished_at),
            row.reason or "",
        ]
    return cells


HEADER = [
    "STUDY INSTANCE UID",
    "ACCESSION",
    "STUDY DATE",
    "STATE",
    "FINDING",
    "PROB",
    "THRESH",
    "DELIVERED",
    "RECEIVED (UTC)",
]
WIDE_HEADER = ["SENDER", "IMG", "MODEL", "FINISHED (UTC)", "REASON"]
_RIGHT = {"PROB", "THRESH", "IMG"}


def write_studies(rows: Sequence[StudyRow], out: TextIO, *, wide: bool) -> None:
    """Write ``rows`` as an aligned table; reasons inline (wide) or on their own line."""
    header = HEADER + (WIDE_HEADER if wide else [])
    table = [header] + [_cells(r, wide) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if h in _RIGHT else c.ljust(w)
            for c, w, h in zip(cells, widths, header, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out.write(fmt(header) + "\n")
    for row, cells in zip(rows, table[1:], strict=True):
        out.write(fmt(cells) + "\n")
        if not wide and row.reason:
            out.write(f"    reason: {row.reason}\n")
    if not rows:
        out.write("(no study)\n")


def rows_as_json(rows: Sequence[StudyRow]) -> list[dict[str, Any]]:
    """JSON-ready rows, with ``decision`` and ``delivered`` added."""
    out = []
    for r in rows:
        d = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in vars(r).items()}
        d["decision"] = r.decision
        d["delivered"] = r.delivered
        out.append(d)
    return out


def _print_rows(rows: Sequence[StudyRow], args: argparse.Namespace) -> None:
    if args.format == "json":
        json.dump(rows_as_json(rows), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    wide = args.wide if args.wide is not None else not sys.stdout.isatty()
    write_studies(rows, sys.stdout, wide=wide)


def cmd_list(args: argparse.Namespace) -> int:
    """``radflag studies``: the most recent studies."""
    from db.queries import list_studies

    _print_rows(list_studies(open_sessions(args.config), limit=args.limit), args)
    return 0


# -- find -------------------------------------------------------------------------------------
def _patient_key(settings: Settings, patient_id: str) -> str:
    """Hash ``patient_id`` as ingest does, reading (never creating) the key file."""
    from daemon.app import pseudonym_key
    from db.ingest import PatientIdPolicy

    if settings.privacy.store_patient_id_in_clear:
        return patient_id
    key_file = settings.storage.spool_dir.parent / "pseudonym.key"
    if not settings.privacy.pseudonym_key and not key_file.is_file():
        raise AdminError(
            f"no pseudonym key (privacy.pseudonym_key empty and no {key_file}): "
            "no patient ID has been stored yet"
        )
    key = PatientIdPolicy(key=pseudonym_key(settings)).key_for(patient_id)
    return key or ""


def cmd_find(args: argparse.Namespace) -> int:
    """``radflag studies find --accession A | --patient-id P``."""
    from db.admin_actions import find_studies
    from db.queries import list_studies

    if not args.accession and not args.patient_id:
        raise AdminError("give --accession or --patient-id")
    settings = load_settings(Path(args.config) if args.config else None)
    sessions = open_sessions(args.config)
    keys = [_patient_key(settings, args.patient_id.strip())] if args.patient_id else []
    uids = find_studies(sessions, accession_number=args.accession, patient_keys=keys)
    rows = list_studies(sessions, limit=max(1, len(uids)), study_uids=uids) if uids else []
    _print_rows(rows, args)
    return 0 if rows else 1


# -- reprocess / resend ------------------------------------------------------------------------
def cmd_reprocess(args: argparse.Namespace) -> int:
    """``radflag studies reprocess UID…|--since WHEN``: classify finished studies again."""
    from db.admin_actions import ActionRefused, finished_since, request_reprocess

    sessions = open_sessions(args.config, write=True)
    uids = list(args.uids)
    if args.since is not None:
        uids += finished_since(sessions, args.since)
    if not uids:
        raise AdminError("nothing to reprocess: give Study Instance UIDs or --since")
    try:
        done = request_reprocess(sessions, uids, actor="cli")
    except ActionRefused as exc:
        raise AdminError(str(exc)) from None
    print(f"queued {len(done)} stud{'y' if len(done) == 1 else 'ies'} for classification:")
    for uid in done:
        print(f"  {uid}")
    print("the running radflag serve classifies them and sends the new results")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    """``radflag studies resend UID… [--to NAME|AE]``: queue stored results again."""
    from daemon.sink import destination_targets
    from db.admin_actions import ActionRefused, resend_results

    settings = load_settings(Path(args.config) if args.config else None)
    try:
        targets = destination_targets(settings.destinations, args.to)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    sessions = open_sessions(args.config, write=True)
    try:
        n = resend_results(
            sessions, args.uids, targets, Path(settings.storage.results_dir), actor="cli"
        )
    except ActionRefused as exc:
        raise AdminError(str(exc)) from None
    names = ", ".join(t.name for t in targets)
    print(
        f"queued {n} result object{'s' if n != 1 else ''} for {names}; "
        "see `radflag outbox list --state PENDING`"
    )
    return 0


# -- registration -----------------------------------------------------------------------------
def _when_arg(text: str) -> datetime:
    try:
        return parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_table_options(p: argparse.ArgumentParser) -> None:
    """``--format`` and ``--wide/--narrow`` of the study tables."""
    p.add_argument(
        "--format", choices=["table", "json"], default="table", help="table (default) or JSON"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--wide",
        dest="wide",
        action="store_true",
        default=None,
        help="one line per study with sender, images, model, reason "
        "(default when output is not a terminal)",
    )
    group.add_argument(
        "--narrow",
        dest="wide",
        action="store_false",
        help="fewer columns, reason on its own line (default on a terminal)",
    )


def register(studies_sub: Any) -> None:
    """Add ``find``, ``reprocess`` and ``resend`` under ``radflag studies``."""
    find = studies_sub.add_parser(
        "find",
        help="find studies by accession number or patient ID",
        description="Find studies by Accession Number (0008,0050) or Patient ID (0010,0020); "
        "the patient ID is hashed with the configured key exactly as at ingest.",
    )
    find.add_argument("--accession", metavar="A", help="Accession Number")
    find.add_argument("--patient-id", metavar="P", help="Patient ID as the RIS/PACS shows it")
    add_table_options(find)
    find.set_defaults(func=cmd_find)

    rep = studies_sub.add_parser(
        "reprocess",
        help="classify finished studies again (audited)",
        description="Put finished studies (DONE, NOT_APPLICABLE, FAILED, DELIVERY_FAILED, or "
        "stuck DELIVERING) back in the queue; the running daemon classifies them again and "
        "sends the new results (same SOP Instance UIDs, so the PACS replaces its copy).",
    )
    rep.add_argument("uids", nargs="*", metavar="UID", help="Study Instance UIDs")
    rep.add_argument(
        "--since",
        type=_when_arg,
        metavar="WHEN",
        help="every finished study last received since WHEN (24h, 7d, ISO 8601)",
    )
    rep.set_defaults(func=cmd_reprocess)

    resend = studies_sub.add_parser(
        "resend",
        help="send the stored results of studies again (audited)",
        description="Queue the stored result objects (SR/SC) of classified studies again, to "
        "every configured destination or to one (--to).",
    )
    resend.add_argument("uids", nargs="+", metavar="UID", help="Study Instance UIDs")
    resend.add_argument(
        "--to", metavar="NAME|AE", help="only this configured destination (its name or AE title)"
    )
    resend.set_defaults(func=cmd_resend)
