"""`edge-agent audit verify|show`: check the audit trail's hash chain, list its entries.

verify exits 0 when every entry chains to the one before, 1 with the first bad line (one line)
otherwise, 2 for a missing or unreadable log. A chain cannot show that its newest entries were
cut off or its whole tail rewritten: verify prints the last entry's seq and hash, to compare
with the copy published on `<prefix>/<line>/audit`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edge_agent.errors import CheckFailed, UserError
from edge_agent.lifecycle import audit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COLUMNS = ("time", "seq", "action", "result", "who", "source", "where", "what", "reason")
MAX_CELL = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check the hash chain; exit 1 at the first bad line")
    show = sub.add_parser("show", help="list the entries (newest last)")
    for q in (verify, show):
        where = q.add_mutually_exclusive_group()
        where.add_argument("--path", type=Path, help="the audit log (default: the config's)")
        where.add_argument("--config", type=Path, metavar="FILE", help="take audit.path from it")
    show.add_argument(
        "--since",
        metavar="WHEN",
        help="only entries from then on: an ISO time (2026-12-06T08:00, local time unless it "
        "gives a zone) or a duration back from now (90s, 15m, 8h, 2d, 1w)",
    )
    show.add_argument("--action", help="only this action (e.g. promote)")
    show.add_argument("--json", action="store_true", help="the entries as stored, one a line")


def run(args: argparse.Namespace) -> int:
    path = _log_path(args.path, args.config)
    if not path.is_file():
        raise UserError(f"no audit log at {path}")
    if args.audit_command == "verify":
        return _verify(path)
    since = parse_since(args.since, dt.datetime.now(dt.timezone.utc)) if args.since else None
    try:
        rows = list(select(audit.entries(path), since, args.action))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if args.json:
        for entry in rows:
            sys.stdout.write(audit.canonical(entry).decode() + "\n")  # as stored
    else:
        sys.stdout.write(table(rows))
    return 0


def _log_path(path: Path | None, config: Path | None) -> Path:
    if path is not None:
        return path
    if config is None:
        raise UserError("give --path (the audit log) or --config (the agent's config)")
    from edge_agent.agent.config import load_config

    found = load_config(config).audit
    if found is None:
        raise UserError(f"{config}: no audit log configured")
    return found


def _verify(path: Path) -> int:
    try:
        verdict = audit.verify_file(path)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not verdict.ok:
        raise CheckFailed(f"{path}: line {verdict.bad_line}: {verdict.problem}")
    print(
        f"{path}: {verdict.entries} entries, chain intact; last seq {verdict.head.seq} "
        f"hash {verdict.head.hash}"
    )
    return 0


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """`--since` as an aware time: a duration back from `now`, or an ISO time (local time
    when it names no zone). UserError for anything else."""
    match = _DURATION.match(text)
    if match:
        return now - dt.timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(
            f"--since: {text!r} is neither an ISO time (2026-12-06T08:00) nor a duration "
            "(90s, 15m, 8h, 2d, 1w)"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def select(
    entries: Iterable[Mapping[str, Any]], since: dt.datetime | None, action: str | None
) -> Iterable[Mapping[str, Any]]:
    for entry in entries:
        if action is not None and entry["action"] != action:
            continue
        if since is not None and _time(entry) < since:
            continue
        yield entry


def _time(entry: Mapping[str, Any]) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(entry["time"])
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


def table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Fixed-width columns, one entry a line; long cells cut with '...'."""
    cells = [[_cell(key, entry.get(key)) for key in COLUMNS] for entry in rows]
    if not cells:
        return "no entries\n"
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *cells, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(COLUMNS), *cells]
    ]
    return "\n".join(lines) + "\n"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "time":
        return _time({"time": value}).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    text = json.dumps(value, sort_keys=True, separators=(",", ":")) if key == "what" else str(value)
    if key == "what" and text == "{}":
        return "-"
    # a cell is one line whatever a who or reason holds
    text = " ".join(text.split())
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."
