"""B2's in-process measure: the account sync itself, as the daemon runs it each cycle, without process start-up.

Run as its own process against an inboxd config: builds the Runner as `inboxd run` does (its sync sessions kept
open for the next sync, `[sync] keep_session`), runs one warm-up cycle (engine, token, imports, the session), then
times `--repeat` cycles and counts the IMAP commands each sent, client-side (every imaplib command goes through
IMAP4._command), attributed to the folder they were about. Then the same with a new session for every cycle (what
a sync more than keep_session after the last one costs). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from inboxd import db, logs
from inboxd.blobs import BlobStore
from inboxd.clock import SystemClock
from inboxd.config import load_config
from inboxd.crypto import SecretBox
from inboxd.kept_sessions import KeptSessions
from inboxd.runner import Runner
from inboxd.store import Store

_SESSION_COMMANDS = {"CAPABILITY", "STARTTLS", "AUTHENTICATE", "LOGIN", "ID", "ENABLE", "LOGOUT", "LIST", "NOOP"}


class CommandLog:
    """Every IMAP command the process sends: (name, folder it concerns or None)."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, str | None]] = []
        self._selected: str | None = None
        original = imaplib.IMAP4._command  # type: ignore[attr-defined]

        def counting(imap: imaplib.IMAP4, name: str, *args: Any) -> Any:
            self._record(name.upper(), args)
            return original(imap, name, *args)

        imaplib.IMAP4._command = counting  # type: ignore[attr-defined]
        self.status_ms = 0.0  # STATUS round trips: mostly the server's time to open each mailbox
        simple = imaplib.IMAP4._simple_command  # type: ignore[attr-defined]

        def timing(imap: imaplib.IMAP4, name: str, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return simple(imap, name, *args)
            finally:
                if name.upper() == "STATUS":
                    self.status_ms += (time.perf_counter() - started) * 1000

        imaplib.IMAP4._simple_command = timing  # type: ignore[attr-defined]

    def _record(self, name: str, args: tuple[Any, ...]) -> None:
        if name in ("SELECT", "EXAMINE", "STATUS"):
            folder = str(args[0]).strip('"') if args else None
            if name != "STATUS":
                self._selected = folder
            self.commands.append((name, folder))
        elif name in _SESSION_COMMANDS:
            self.commands.append((name, None))
        else:
            sub = f"{name} {str(args[0]).upper()}" if name == "UID" and args else name
            self.commands.append((sub, self._selected))

    def take(self) -> tuple[list[tuple[str, str | None]], float]:
        taken, self.commands = self.commands, []
        status_ms, self.status_ms = self.status_ms, 0.0
        return taken, status_ms


Cycles = tuple[list[float], list[list[tuple[str, str | None]]], list[float], int]


def cycles(runner: Runner, commands: CommandLog, repeat: int) -> Cycles | None:
    """A warm-up cycle and `repeat` timed ones: wall ms, commands and STATUS ms of each, new messages of the last."""
    timings: list[float] = []
    per_cycle: list[list[tuple[str, str | None]]] = []
    status_ms: list[float] = []
    new = 0
    commands.take()
    for _ in range(repeat + 1):
        started = time.perf_counter()
        results = runner.sync_once()
        timings.append((time.perf_counter() - started) * 1000)
        taken, status = commands.take()
        per_cycle.append(taken)
        status_ms.append(status)
        if not all(r.ok for r in results):
            print(json.dumps({"error": [r.reason for r in results if not r.ok]}))
            return None
        new = sum(r.stats.new_messages for r in results if r.stats is not None)
    return timings, per_cycle, status_ms, new


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    with args.log.open("a") as log_stream:
        logs.configure(config.log_level, stream=log_stream, json=True)
        clock = SystemClock()
        engine = db.create_engine(config.database.url)
        store = Store(
            engine,
            clock=clock,
            secret_box=SecretBox.from_key_file(config.secrets.key_file),
            blobs=BlobStore(config.sync.attachments_dir),
        )
        kept = KeptSessions(clock=clock, keep=config.sync.keep_session)
        commands = CommandLog()
        warm = cycles(Runner(config, store, clock=clock, kept=kept), commands, args.repeat)
        kept.close_all()
        fresh = cycles(Runner(config, store, clock=clock), commands, args.repeat)
        engine.dispose()
    if warm is None or fresh is None:
        return 1
    timings, per_cycle, status_ms, new = warm
    measured = per_cycle[-1]
    folder_counts = Counter(folder for _, folder in measured if folder is not None)
    fresh_timings, fresh_cycles, fresh_status_ms, _ = fresh
    json.dump(
        {
            "warmup_ms": timings[0],
            "sync_ms": statistics.median(timings[1:]),
            "sync_ms_all": timings[1:],
            "status_ms": statistics.median(status_ms[1:]),
            "new_messages_last": new,
            "commands": len(measured),
            "command_names": dict(Counter(name for name, _ in measured)),
            "folders": len(folder_counts),
            "max_commands_per_folder": max(folder_counts.values(), default=0),
            "session_commands": sum(1 for _, folder in measured if folder is None),
            "new_session_sync_ms": statistics.median(fresh_timings[1:]),
            "new_session_status_ms": statistics.median(fresh_status_ms[1:]),
            "new_session_commands": len(fresh_cycles[-1]),
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
