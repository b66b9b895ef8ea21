"""Progress display for long first syncs on a TTY: messages done/total and rate, per account, on one line.

Silent when stderr is not a terminal (systemd, CI); the same numbers are in the structured logs.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from inboxd.clock import Clock


class ProgressDisplay:
    def __init__(self, clock: Clock, stream: TextIO | None = None, *, min_interval: float = 0.2) -> None:
        self._stream = stream or sys.stderr
        self._clock = clock
        self._enabled = self._stream.isatty()
        self._lock = threading.Lock()
        # when the account's first update came, and its done then: an import resumed starts from what its earlier
        # attempts processed, which this run's rate leaves out
        self._started: dict[str, tuple[float, int]] = {}
        self._state: dict[str, tuple[int, int]] = {}
        self._last_draw = 0.0
        self._min_interval = min_interval
        self._drawn = False

    def update(self, account: str, done: int, total: int) -> None:
        if not self._enabled:
            return
        with self._lock:
            now = self._clock.monotonic()
            self._started.setdefault(account, (now, done))
            self._state[account] = (done, total)
            if now - self._last_draw < self._min_interval and done < total:
                return
            self._last_draw = now
            self._stream.write("\r\x1b[2K" + self.line(now))
            self._stream.flush()
            self._drawn = True

    def line(self, now: float) -> str:
        parts = []
        for account, (done, total) in sorted(self._state.items()):
            started, done_then = self._started[account]
            elapsed = max(now - started, 1e-6)
            pct = f"{100 * done / total:.0f}%" if total else "-"
            parts.append(f"{account}: {done}/{total} msgs {pct} {(done - done_then) / elapsed:.0f}/s")
        return " | ".join(parts)

    def finish(self) -> None:
        if self._enabled and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
