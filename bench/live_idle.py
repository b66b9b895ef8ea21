"""B6, many idle accounts in one process: 200 accounts on the stack, `inboxd run` until every one is synced and its
IDLE watcher connected, then RSS, CPU at rest, threads, fds and connections sampled from /proc once a second. RSS,
CPU, threads and fds are the daemon's and its parser workers' together; connections are the daemon's.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from live_common import (
    Daemon,
    MailStack,
    Result,
    cpu_percent,
    established,
    proc_sample,
    running_daemon,
    scratch_database,
    scratch_dir,
)
from live_dovecot import LOGIN_PROCESS_LIMIT, private_dovecot

SETTLE_TIMEOUT = 600.0
RSS_TARGET_MB = 300.0
CPU_TARGET = 2.0


def run(stack: MailStack, db_kind: str, *, quick: bool, accounts: int = 200, server: str = "private") -> list[Result]:
    """`server`: "private" (a Dovecot of our own with imap-login process_limit raised, see live_dovecot.py) or
    "shared" (the stack's own Dovecot, which other test runs use at the same time)."""
    seconds = 30 if quick else 60
    users = [stack.new_user("b6") for _ in range(accounts)]
    with contextlib.ExitStack() as scope:
        directory = scope.enter_context(scratch_dir("b6"))
        if server == "private":
            stack = scope.enter_context(private_dovecot(stack, directory / "dovecot"))
            dovecot_log = directory / "dovecot" / "dovecot.log"
        else:
            dovecot_log = stack.root / "log" / "dovecot.log"
        log_start = dovecot_log.stat().st_size if dovecot_log.exists() else 0
        url = scope.enter_context(scratch_database(db_kind, directory))
        # each sync's connection is kept `keep` seconds (sync.keep_session, 5 min by default): the samples start with
        # those open too (two connections per account) and end after they were logged out (one, IDLE's)
        keep = seconds // 3
        extra = f'interval = "1h"\nkeep_session = "{keep}s"'
        daemon = scope.enter_context(running_daemon(stack, url, users, directory=directory, sync_extra=extra))
        settle, settled = _settle(daemon, accounts, stack.imap_port)
        samples, connections = [], []
        for _ in range(seconds + 1):
            daemon.assert_alive()
            samples.append(proc_sample(daemon.pid))
            connections.append((established(daemon.pid, stack.imap_port), established(daemon.pid)))
            time.sleep(1.0)
        dovecot = dovecot_processes()
        reconnects = daemon.log.read_text(errors="replace").count('"idle.reconnect"')
        dovecot_warnings = _dovecot_warnings(dovecot_log, log_start)
    where = f"own Dovecot, login limit {LOGIN_PROCESS_LIMIT}" if server == "private" else "stack Dovecot"
    case = f"{db_kind}, {accounts} accounts idle, {seconds} s (sync connections kept {keep} s), {where}"
    rss_mb = max(s.rss_kib for s in samples) / 1024
    cpu = cpu_percent(samples[0], samples[-1])
    imap_min = min(c[0] for c in connections)
    results = [
        Result("B6", case, "time to synced + idling", round(settle, 1), "s", None, settled or None),
        Result("B6", case, "RSS max", round(rss_mb, 1), "MB", f"<= {RSS_TARGET_MB:.0f} MB", rss_mb <= RSS_TARGET_MB),
        Result("B6", case, "CPU at rest", round(cpu, 2), "% of a core", f"<= {CPU_TARGET} %", cpu <= CPU_TARGET),
        Result("B6", case, "CPU worst 5 s", round(_worst_window(samples, 5), 2), "% of a core"),
        Result("B6", case, "threads", float(max(s.threads for s in samples)), "count"),
        Result("B6", case, "open fds", float(max(s.fds for s in samples)), "count"),
        Result("B6", case, "IMAP connections (max: sync ones kept)", float(max(c[0] for c in connections)), "count"),
        Result("B6", case, "IMAP connections (min)", float(imap_min), "count", f"= {accounts}", imap_min == accounts),
        Result("B6", case, "TCP connections (max, all)", float(max(c[1] for c in connections)), "count"),
        Result("B6", case, "idle.reconnect log lines", float(reconnects), "count"),
        Result("B6", case, "Dovecot imap processes (all instances)", float(dovecot.get("imap", 0)), "count"),
        Result("B6", case, "Dovecot imap-login processes (all)", float(dovecot.get("imap-login", 0)), "count"),
        Result(
            "B6", case, "Dovecot limit warnings", float(len(dovecot_warnings)), "count", "= 0", not dovecot_warnings
        ),
    ]
    for line in dovecot_warnings[:3]:
        print(f"  dovecot: {line}")
    return results


def _settle(daemon: Daemon, accounts: int, imap_port: int) -> tuple[float, bool]:
    """Wait until every account synced twice (first cycle + the watcher's catch-up) and holds at least one IMAP
    connection (IDLE's; the kept sync connections come on top), stable for 2 s; on timeout carry on and say so (a
    server limit shows up as missing connections)."""
    started = time.monotonic()
    stable_since = None
    last_report = started
    while time.monotonic() - started < SETTLE_TIMEOUT:
        daemon.assert_alive()
        syncs = daemon.metric("inboxd_account_syncs_total", 'result="ok"')
        conns = established(daemon.pid, imap_port)
        if syncs >= 2 * accounts and conns >= accounts:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= 2.0:
                return time.monotonic() - started, True
        else:
            stable_since = None
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            print(f"  B6: {time.monotonic() - started:.0f} s: {syncs:.0f} ok syncs, {conns} IMAP connections")
        time.sleep(0.5)
    return time.monotonic() - started, False


def _worst_window(samples: list, width: int) -> float:  # type: ignore[type-arg]
    return max(
        (cpu_percent(samples[i], samples[i + width]) for i in range(len(samples) - width)),
        default=float("nan"),
    )


def _dovecot_warnings(path: Path, start: int) -> list[str]:
    """Dovecot's own complaints about limits since `start` (process_limit, client_limit, fd limits)."""
    if not path.exists():
        return []
    with path.open("rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    pattern = re.compile(r"process_limit|client_limit|Too many|max_userip|Out of file|fd_limit", re.IGNORECASE)
    return [line for line in text.splitlines() if pattern.search(line)]


def dovecot_processes() -> dict[str, int]:
    counts: dict[str, int] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name in ("imap", "imap-login"):
                counts[name] = counts.get(name, 0) + 1
    return counts
