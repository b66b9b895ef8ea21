"""Live benchmarks of `inboxd run` against the loopback mail stack (issue #8): B3 push latency, B4 outbox latency,
B6 200 idle accounts in one process. Prints a table; --json writes the rows for bench/run.

Assumes the stack (tests/mailstack/start.sh) and PostgreSQL are up. Usage:
    .venv/bin/python bench/live.py [--quick] [--json FILE] [--only B3,B4,B6] [--db sqlite|postgresql[,...]]
Without --db, B3 and B6 run on PostgreSQL and B4 on both (SQLite polls the outbox, PostgreSQL is woken by NOTIFY).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import live_idle
import live_outbox
import live_push
from live_common import MailStack, Result

BENCHES: dict[str, tuple[Callable[..., list[Result]], tuple[str, ...]]] = {
    "B3": (live_push.run, ("postgresql",)),
    "B4": (live_outbox.run, ("postgresql", "sqlite")),
    "B6": (live_idle.run, ("postgresql",)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages, 30 s of B6 sampling")
    parser.add_argument("--json", type=Path, help="write the result rows to this file")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated: B3,B4,B6")
    parser.add_argument("--db", help="comma-separated: sqlite,postgresql (default: per benchmark)")
    parser.add_argument(
        "--b6-server",
        choices=("private", "shared"),
        default="private",
        help="B6 against a private Dovecot with imap-login process_limit raised (default), or the stack's own",
    )
    parser.add_argument("--b6-accounts", type=int, default=200)
    args = parser.parse_args(argv)
    benches = {
        **BENCHES,
        "B6": (partial(live_idle.run, accounts=args.b6_accounts, server=args.b6_server), BENCHES["B6"][1]),
    }
    only = [b.strip().upper() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in only if b not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    dbs = [d.strip() for d in args.db.split(",")] if args.db else None
    if dbs and any(d not in ("sqlite", "postgresql") for d in dbs):
        parser.error("--db takes sqlite and/or postgresql")
    stack = MailStack(root=Path(os.environ.get("MAILSTACK_ROOT", "/tmp/inboxd-mailstack")))  # noqa: S108 (the stack's default)

    results: list[Result] = []
    failed = False
    for name in only:
        run, default_dbs = benches[name]
        for db_kind in dbs or default_dbs:
            started = time.monotonic()
            print(f"{name} on {db_kind}{' (quick)' if args.quick else ''} ...", flush=True)
            try:
                rows = run(stack, db_kind, quick=args.quick)
            except Exception:  # one benchmark's failure is reported, the others still run
                traceback.print_exc()
                failed = True
                rows = [Result(name, f"{db_kind}", "error (see output)", math.nan, "", None, False)]
            results.extend(rows)
            print(f"{name} on {db_kind} done in {time.monotonic() - started:.0f} s", flush=True)
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([r.as_json() for r in results], indent=1, allow_nan=False, default=str))
    return 1 if failed else 0


def table(results: list[Result]) -> str:
    header = ["bench", "case", "metric", "value", "unit", "target", "ok"]
    rows = [
        [
            r.bench,
            r.case,
            r.metric,
            _number(r.value),
            r.unit,
            r.target or "",
            {True: "yes", False: "NO", None: ""}[r.ok],
        ]
        for r in results
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value == int(value) and abs(value) >= 10:
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


if __name__ == "__main__":
    sys.exit(main())
