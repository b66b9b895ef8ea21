"""What runs in a parser worker process (see inboxd.parsing): parse a chunk of bodies, and exit with the daemon.

Kept apart so that a worker imports inboxd.parse and nothing more: no structlog, no daemon (each worker is a process
of its own; what it imports is memory it holds for the daemon's lifetime).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Mapping

from inboxd.errors import UnparseableMessage
from inboxd.parse import ParsedMessage, parse_message

ParseOutcome = ParsedMessage | UnparseableMessage


def parse_all(bodies: Mapping[int, bytes], max_attachment_bytes: int) -> dict[int, ParseOutcome]:
    outcomes: dict[int, ParseOutcome] = {}
    for uid, raw in bodies.items():
        try:
            outcomes[uid] = parse_message(raw, max_attachment_bytes=max_attachment_bytes)
        except UnparseableMessage as exc:
            outcomes[uid] = exc
    return outcomes


def parse_chunk(bodies: list[tuple[int, bytes]], max_attachment_bytes: int) -> list[tuple[int, ParsedMessage | str]]:
    """Parse, with an unparseable body's reason as a plain string (simple to send back)."""
    return [
        (uid, outcome if isinstance(outcome, ParsedMessage) else outcome.message)
        for uid, outcome in parse_all(dict(bodies), max_attachment_bytes).items()
    ]


def exit_with(daemon_pid: int) -> None:
    """A worker's initializer: exit as soon as the daemon is gone. It may die by SIGKILL (the OOM killer, a
    `kill -9`) and never shut the pool down, and a worker waiting for work would wait forever."""

    def watch() -> None:
        try:
            handle = os.pidfd_open(daemon_pid)  # readable once that process has exited (Linux 5.3)
        except (AttributeError, OSError):
            while os.getppid() == daemon_pid:  # spawned by the daemon: re-parented when it dies
                time.sleep(1)
        else:
            select.select([handle], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="inboxd-watch-daemon", daemon=True).start()
