"""Clocks for tests that run real syncs: the system's time, with a monotonic clock the test steers.

EveryReportWritten makes a first sync write each of its progress reports to mail_accounts (the HR app's view).
"""

from __future__ import annotations

from inboxd.clock import SystemClock
from inboxd.runner import IMPORT_EVERY


class EveryReportWritten(SystemClock):
    """The system's time, with a monotonic clock that moves IMPORT_EVERY at each reading: every progress report of
    an import is written to mail_accounts (runner._ImportProgress), not one per 5 s."""

    def __init__(self) -> None:
        self._monotonic = 0.0

    def monotonic(self) -> float:
        self._monotonic += IMPORT_EVERY
        return self._monotonic
