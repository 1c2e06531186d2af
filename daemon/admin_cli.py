"""Administrator commands: ``radflag audit``, ``radflag stats``, ``radflag studies show UID``.

All of them only read the database (the schema must be at the version this radflag knows;
they never create or migrate it). Times are shown and parsed in UTC.

Examples
--------
``radflag audit --since 24h --calling-ae MODALITY --format csv``
``radflag audit --event STUDY_FAILED --event DELIVERY_DEAD --since 2024-05-01``
``radflag audit --model-version 1.2.0 --decision positive --format json``
``radflag studies show 1.2.840.113619.2.55.3 --format json``
``radflag stats --since 30d``
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import load_settings
from db.admin_timeline import StudyTimeline, study_timeline
from db.audit import AuditEventType
from db.engine import make_engine, make_read_session_factory, make_session_factory
from db.models import utcnow
from db.queries import AuditQuery, AuditRow, search_audit
from db.schema import SchemaMismatch, ensure_schema
from db.states import StudyState
from db.stats import Stats, collect_stats

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class AdminError(RuntimeError):
    """A problem the administrator must fix (no database, wrong schema); exit status 2."""


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """Parse ``--since``/``--until``: ISO 8601 (naive = UTC), ``now``, or relative ``24h``.

    Relative values count back from now: ``90s``, ``30m``, ``24h``, ``7d``, ``2w``.

    Raises
    ------
    ValueError
        With a message that says what is accepted.
    """
    ref = now or utcnow()
    if text.strip().lower() == "now":
        return ref
    rel = _RELATIVE.match(text)
    if rel:
        amount, unit = float(rel.group(1)), rel.group(2).lower()
        return ref - timedelta(seconds=amount * _UNIT_S[unit])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use ISO 8601 (2024-05-01, 2024-05-01T08:00:00Z), "
            "'now', or a relative age like 90s, 30m, 24h, 7d, 2w"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _when_arg(text: str) -> datetime:
    try:
        return parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _event_arg(text: str) -> list[AuditEventType]:
    out: list[AuditEventType] = []
    for part in (p.strip().upper() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(AuditEventType(part))
        except ValueError:
            known = ", ".join(t.value for t in AuditEventType)
            raise argparse.ArgumentTypeError(
                f"unknown event type {part!r}; known: {known}"
            ) from None
    return out


def _state_arg(text: str) -> StudyState:
    try:
        return StudyState(text.strip().upper())
    except ValueError:
        known = ", ".join(s.value for s in StudyState)
        raise argparse.ArgumentTypeError(f"unknown state {text!r}; known: {known}") from None


def open_sessions(config: str | None, *, write: bool = False) -> sessionmaker[Session]:
    """Open the configured database for an admin command: no schema creation, no migration.

    Sessions are read-only-style (SQLite: ``BEGIN DEFERRED``) unless ``write``.

    Raises
    ------
    AdminError
        When the SQLite file does not exist or the schema is not the expected one.
    """
    settings = load_settings(Path(config) if config else None)
    url = make_url(settings.database.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(str(url.database)).expanduser()
        if not path.is_file():
            raise AdminError(f"no radflag database at {path} (check database.url)")
    engine = make_engine(settings.database.url)
    try:
        ensure_schema(engine, create_if_empty=False)
    except SchemaMismatch as exc:
        engine.dispose()
        raise AdminError(str(exc)) from None
    except SQLAlchemyError as exc:
        from daemon.startup import database_cause

        engine.dispose()
        raise AdminError(f"database.url: {database_cause(settings.database.url, exc)}") from None
    return make_session_factory(engine) if write else make_read_session_factory(engine)


def _t(value: datetime | None, *, ms: bool = False) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f" if ms else "%Y-%m-%d %H:%M:%S")[
        : 23 if ms else 19
    ]


def _compact(detail: dict[str, Any], width: int | None = None) -> str:
    text = json.dumps(detail, separators=(",", ":"), sort_keys=True, default=str)
    if width is not None and len(text) > width:
        return text[: width - 1] + "…"
    return text


# -- radflag audit --------------------------------------------------------------------------
AUDIT_COLUMNS = (
    "id",
    "at",
    "event_type",
    "actor",
    "study_instance_uid",
    "sop_instance_uid",
    "study_state",
    "calling_ae",
    "detail",
)


def write_audit(rows: list[AuditRow], fmt: str, out: TextIO) -> None:
    """Write audit rows as ``table``, ``csv`` (one row per event, detail as JSON) or ``json``."""
    if fmt == "json":
        json.dump([r.as_dict() for r in rows], out, indent=2, default=str)
        out.write("\n")
        return
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(AUDIT_COLUMNS)
        for r in rows:
            d = r.as_dict()
            writer.writerow([_compact(d[c]) if c == "detail" else d[c] for c in AUDIT_COLUMNS])
        return
    out.write(f"{'AT (UTC)':<23}  {'EVENT':<25} {'ACTOR':<30} {'STUDY':<64} DETAIL\n")
    for r in rows:
        study = r.study_instance_uid or "-"
        out.write(
            f"{_t(r.at, ms=True):<23}  {r.event_type:<25} {r.actor[:30]:<30} {study:<64} "
            f"{_compact(r.detail, 100)}\n"
        )
    out.write(f"({len(rows)} events)\n")


def _cmd_audit(args: argparse.Namespace) -> int:
    events = tuple(t for group in (args.event or []) for t in group)
    try:
        query = AuditQuery(
            since=args.since,
            until=args.until,
            event_types=events,
            calling_ae=args.calling_ae,
            study_instance_uid=args.study,
            finding=args.finding,
            positive=None if args.decision is None else args.decision == "positive",
            model_name=args.model,
            model_version=args.model_version,
            state=args.state,
            limit=args.limit,
            newest_first=args.newest_first,
        )
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    rows = search_audit(open_sessions(args.config), query)
    write_audit(rows, args.format, sys.stdout)
    return 0


# -- radflag stats --------------------------------------------------------------------------
def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def write_stats(stats: Stats, fmt: str, out: TextIO) -> None:
    """Write the statistics as a ``table`` or as ``json``."""
    if fmt == "json":
        json.dump(stats.as_dict(), out, indent=2)
        out.write("\n")
        return
    out.write(
        f"window (UTC): {_t(stats.since) if stats.since else 'beginning'} -> {_t(stats.until)}"
        f"   studies first received in window: {stats.studies_in_window}\n\n"
    )
    out.write("STUDIES BY STATE (all time)\n")
    for state, n in stats.studies_by_state.items():
        out.write(f"  {state:<18} {n:>8}\n")
    out.write("\nDELIVERIES BY STATE (all time)\n")
    for state, n in stats.deliveries_by_state.items():
        out.write(f"  {state:<18} {n:>8}\n")
    out.write(
        f"\nSTAGE LATENCY, seconds   {'N':>6} {'p50':>9} {'p90':>9} {'p95':>9} {'p99':>9} "
        f"{'max':>9}\n"
    )
    for lat in stats.latencies:
        out.write(
            f"  {lat.stage:<23}{lat.n:>6} {_num(lat.p50_s):>9} {_num(lat.p90_s):>9} "
            f"{_num(lat.p95_s):>9} {_num(lat.p99_s):>9} {_num(lat.max_s):>9}\n"
        )
    out.write("\nPOSITIVE RATE PER MODEL VERSION PER DAY (UTC, current results)\n")
    out.write(
        f"  {'DAY':<10} {'MODEL':<24} {'VERSION':<14} {'FINDING':<24} {'N':>6} "
        f"{'PRESENT':>7} {'RATE':>6} {'MEAN P':>7}\n"
    )
    for r in stats.positive_rate:
        finding = f"{r.finding_meaning} ({r.finding_code})" if r.finding_meaning else r.finding_code
        out.write(
            f"  {r.day.isoformat():<10} {r.model_name[:24]:<24} {r.model_version[:14]:<14} "
            f"{finding:<24} {r.n_results:>6} {r.n_positive:>7} "
            f"{r.positive_rate:>6.3f} {r.mean_probability:>7.3f}\n"
        )
    if not stats.positive_rate:
        out.write("  (no results in window)\n")
    out.write("\nFAILURES IN WINDOW (studies FAILED / DELIVERY_FAILED, by reason)\n")
    for f in stats.failures:
        out.write(f"  {f.n_studies:>6}  {f.reason}\n")
    if not stats.failures:
        out.write("  (none)\n")


def _cmd_stats(args: argparse.Namespace) -> int:
    if args.since and args.until and args.since >= args.until:
        raise AdminError("--since must be earlier than --until")
    stats = collect_stats(open_sessions(args.config), since=args.since, until=args.until)
    write_stats(stats, args.format, sys.stdout)
    return 0


# -- radflag studies show UID -------------------------------------------------------------
def write_timeline(tl: StudyTimeline, fmt: str, out: TextIO) -> None:
    """Write a study's timeline as readable ``text`` or as ``json``."""
    if fmt == "json":
        json.dump(tl.as_dict(), out, indent=2, default=str)
        out.write("\n")
        return
    s = tl.study
    out.write(f"STUDY {s.study_instance_uid}\n")
    out.write(
        f"  state {s.state}   sender {s.calling_ae or '-'}   attempts {s.processing_attempts}"
    )
    out.write(
        f"   urgent {'-' if s.urgent is None else ('yes' if s.urgent else 'no')}"
        f"   max probability {_num(s.max_probability, '{:.4f}')}\n"
    )
    out.write(
        f"  received {_t(s.first_received_at)} .. {_t(s.last_received_at)}   ready "
        f"{_t(s.ready_at)}   classified {_t(s.classified_at)}   finished {_t(s.finished_at)}\n"
    )
    if s.lease_owner:
        out.write(f"  leased by {s.lease_owner} until {_t(s.lease_expires_at)}\n")
    if s.failure_reason:
        out.write(f"  failure: {s.failure_reason}\n")
    out.write(f"\nINSTANCES ({len(tl.instances)})\n")
    for i in tl.instances:
        where = f"purged {_t(i.purged_at)}" if i.purged_at else i.path
        flags = (" QUARANTINED" if i.quarantined else "") + (
            f" duplicates={i.duplicate_count}" if i.duplicate_count else ""
        )
        out.write(
            f"  {_t(i.received_at)}  {i.sop_instance_uid}  {i.modality or '-'}  "
            f"{i.size_bytes} B  from {i.calling_ae}@{i.peer_host or '?'}{flags}\n      {where}\n"
        )
    out.write(f"\nRESULTS ({len(tl.results)})\n")
    for r in tl.results:
        out.write(
            f"  {_t(r.created_at)}  {r.model_name} {r.model_version} "
            f"(weights sha256 {r.weights_sha256[:16]}…)  {r.finding_meaning} ({r.finding_code})  "
            f"p={r.probability:.3f} threshold={r.threshold:.2f} "
            f"{'PRESENT' if r.positive else 'ABSENT'}  images={r.n_images} device={r.device}"
            f"{'  SUPERSEDED' if r.superseded else ''}\n"
        )
        if r.sr_sop_instance_uid:
            out.write(f"      SR {r.sr_sop_instance_uid}\n")
    out.write(f"\nDELIVERIES ({len(tl.deliveries)})\n")
    for d in tl.deliveries:
        out.write(
            f"  {d.kind} {d.sop_instance_uid} -> {d.destination} ({d.ae_title}@{d.host}:{d.port})"
            f"  {d.state}  attempts={d.attempts}  sent {_t(d.sent_at)}\n"
        )
        if d.last_error:
            out.write(f"      last error: {d.last_error}\n")
        for n, a in enumerate(d.attempt_history, start=1):
            outcome = "ok" if a.ok else f"failed: {a.error}"
            out.write(f"      attempt {n}  {_t(a.started_at, ms=True)}  {outcome}\n")
    out.write(f"\nAUDIT ({len(tl.events)})\n")
    for e in tl.events:
        sop = f" sop={e.sop_instance_uid}" if e.sop_instance_uid else ""
        out.write(
            f"  {_t(e.at, ms=True)}  {e.event_type:<25} {e.actor}{sop}  {_compact(e.detail, 120)}\n"
        )


def _cmd_show(args: argparse.Namespace) -> int:
    tl = study_timeline(open_sessions(args.config), args.uid)
    if tl is None:
        print(f"radflag: no study {args.uid} in the database", file=sys.stderr)
        return 1
    write_timeline(tl, args.format, sys.stdout)
    return 0


# -- registration -----------------------------------------------------------------------------
def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except AdminError as exc:
            print(f"radflag: {exc}", file=sys.stderr)
            return 2

    return run


def _config_option(p: argparse.ArgumentParser, *, keep_parent: bool = False) -> None:
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=argparse.SUPPRESS if keep_parent else None,
        help="TOML configuration (default: embedded defaults)",
    )


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], *, studies: argparse.ArgumentParser
) -> Any:
    """Add ``audit``, ``stats`` and ``studies show`` to the ``radflag`` parser.

    Parameters
    ----------
    sub
        The top-level subcommands.
    studies
        The existing ``studies`` parser (it keeps listing studies when no subcommand is given).

    Returns
    -------
    argparse._SubParsersAction
        The subcommands of ``studies`` (``daemon.studies_cli`` adds its own).
    """
    audit = sub.add_parser(
        "audit",
        help="search the audit log",
        description="Search the audit log. Filters combine with AND.",
    )
    _config_option(audit)
    audit.add_argument("--since", type=_when_arg, help="ISO 8601 time (UTC if no zone) or 24h/7d")
    audit.add_argument("--until", type=_when_arg, help="ISO 8601 time or relative; exclusive")
    audit.add_argument(
        "--event",
        type=_event_arg,
        action="append",
        metavar="TYPE[,TYPE]",
        help="event type(s), repeatable",
    )
    audit.add_argument("--calling-ae", metavar="AE", help="sender's AE title")
    audit.add_argument("--study", metavar="UID", help="Study Instance UID")
    audit.add_argument("--finding", help="finding code or meaning (e.g. 233604007, pneumonia)")
    audit.add_argument(
        "--decision",
        choices=["positive", "negative"],
        help="finding PRESENT (positive) or ABSENT (negative)",
    )
    audit.add_argument("--model", metavar="NAME", help="model name")
    audit.add_argument("--model-version", metavar="VERSION", help="model version")
    audit.add_argument("--state", type=_state_arg, help="current study state")
    audit.add_argument("--limit", type=int, default=1000, help="most events shown (1000)")
    audit.add_argument("--newest-first", action="store_true", help="newest event first")
    audit.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="output format"
    )
    audit.set_defaults(func=_guarded(_cmd_audit))

    stats = sub.add_parser(
        "stats", help="counts per state, stage latencies, positive rate per model version"
    )
    _config_option(stats)
    stats.add_argument(
        "--since", type=_when_arg, default=None, help="window start (default: 7d ago)"
    )
    stats.add_argument("--until", type=_when_arg, help="window end (default: now)")
    stats.add_argument("--all", action="store_true", help="no window start (all history)")
    stats.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    stats.set_defaults(func=_guarded(_with_default_window(_cmd_stats)))

    studies_sub = studies.add_subparsers(dest="studies_command", required=False)
    show = studies_sub.add_parser("show", help="a study's full timeline")
    _config_option(show, keep_parent=True)
    show.add_argument("uid", help="Study Instance UID (full, as `radflag studies` prints it)")
    show.add_argument(
        "--format", choices=["text", "json"], default="text", help="readable text (default) or JSON"
    )
    show.set_defaults(func=_guarded(_cmd_show))
    return studies_sub


def _with_default_window(
    func: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if args.all:
            args.since = None
        elif args.since is None:
            args.since = parse_when("7d")
        return func(args)

    return run
