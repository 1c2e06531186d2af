"""``radflag outbox``: list, retry or drop delivery outbox entries (operator tool).

``list`` shows entries (newest first) with state, attempts and last error; ``retry`` makes
DEAD entries due again with a fresh attempt budget (the study leaves DELIVERY_FAILED);
``drop`` cancels PENDING/DEAD entries for good. Every change is audited with actor ``cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any


def register(sub: Any) -> None:
    """Add the ``outbox`` command to the ``radflag`` sub-parsers."""
    outbox = sub.add_parser("outbox", help="list, retry or drop result deliveries")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", metavar="FILE", help="TOML configuration")
        return p

    lst = with_config(outbox_sub.add_parser("list", help="show outbox entries"))
    lst.add_argument(
        "--state",
        action="append",
        choices=["PENDING", "SENT", "DEAD", "CANCELLED"],
        help="only entries in this state (repeatable)",
    )
    lst.add_argument("--study", metavar="STUDY_UID", help="only this study")
    lst.add_argument("--limit", type=int, default=100, help="most entries shown (100)")
    lst.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    lst.set_defaults(func=_cmd_list)

    retry = with_config(outbox_sub.add_parser("retry", help="send DEAD entries again"))
    retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    retry.add_argument("--all-dead", action="store_true", help="every DEAD entry")
    retry.set_defaults(func=_cmd_retry)

    drop = with_config(outbox_sub.add_parser("drop", help="cancel PENDING/DEAD entries"))
    drop.add_argument("ids", nargs="+", type=int, metavar="ID")
    drop.set_defaults(func=_cmd_drop)


def _sessions(args: argparse.Namespace) -> Any:
    from daemon.admin_cli import open_sessions

    return open_sessions(args.config, write=True)


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value else "-"


def _cmd_list(args: argparse.Namespace) -> int:
    from db.outbox import DeliveryState, list_deliveries

    states = [DeliveryState(s) for s in args.state] if args.state else None
    rows = list_deliveries(
        _sessions(args), states=states, study_instance_uid=args.study, limit=args.limit
    )
    if args.format == "json":
        print(
            json.dumps(
                [
                    {
                        k: (v.isoformat() if isinstance(v, datetime) else v)
                        for k, v in vars(r).items()
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    dest_w = max([len("DESTINATION")] + [len(r.destination) for r in rows])
    print(
        f"{'ID':>6} {'STATE':<9} {'KIND':<4} {'DESTINATION':<{dest_w}} {'TRY':>3} "
        f"{'NEXT (UTC)':<19} STUDY INSTANCE UID"
    )
    for r in rows:  # full UIDs: they paste into `radflag studies show|resend`
        print(
            f"{r.delivery_id:>6} {r.state:<9} {r.kind:<4} {r.destination:<{dest_w}} "
            f"{r.attempts:>3} {_when(r.next_attempt_at):<19} {r.study_instance_uid}"
        )
        if r.last_error and r.state != "SENT":
            print(f"       last error: {r.last_error}")
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    from db.outbox import DeliveryState, OutboxChangeRefused, list_deliveries, retry_deliveries

    sessions = _sessions(args)
    ids = list(args.ids)
    if args.all_dead:
        ids += [
            e.delivery_id
            for e in list_deliveries(sessions, states=[DeliveryState.DEAD], limit=100_000)
        ]
    if not ids:
        print("radflag outbox retry: give entry ids or --all-dead", file=sys.stderr)
        return 2
    try:
        done = retry_deliveries(sessions, ids)
    except OutboxChangeRefused as exc:
        print(f"radflag outbox retry: {exc}", file=sys.stderr)
        return 1
    print(f"retrying {len(done)} entr{'y' if len(done) == 1 else 'ies'}: {done}")
    return 0


def _cmd_drop(args: argparse.Namespace) -> int:
    from db.outbox import OutboxChangeRefused, drop_deliveries

    try:
        done = drop_deliveries(_sessions(args), args.ids)
    except OutboxChangeRefused as exc:
        print(f"radflag outbox drop: {exc}", file=sys.stderr)
        return 1
    print(f"dropped {len(done)} entr{'y' if len(done) == 1 else 'ies'}: {done}")
    return 0
