"""Which of a node's accounts start syncing now (pure; the daemon's loop carries it out).

Every account syncs on its own: the loop never waits for one account to finish before serving another. Work that
is due waits in `due` (account id -> why) until a slot is free and no sync of that account is running; a reason
that comes up while the account is syncing (new mail pushed in the middle of its sync) keeps it due, so it syncs
once more right after. Two lanes keep a big first sync from holding up everyone else: accounts that have never
finished a sync run in the "first" lane, the others in the "regular" lane, each with its own number of slots. A
push is what a recruiter waits for, so it goes before retries, and retries before the periodic round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum


class Why(IntEnum):
    """Why an account is due, most urgent first (the order in which due accounts take free slots)."""

    PUSH = 0  # its IDLE watcher saw a change
    CHANGED = 1  # the HR app changed contacts or accounts, the config was reloaded, the node took the lease
    RETRY = 2  # a backoff (retry_at) ran out, or its last sync could not even record its outcome
    ROUND = 3  # the periodic sync.interval round


FIRST, REGULAR = "first", "regular"


@dataclass(frozen=True, slots=True)
class Slots:
    """How many syncs may run at once in each lane."""

    first: int
    regular: int

    def of(self, lane: str) -> int:
        return self.first if lane == FIRST else self.regular


def lane(last_sync_at: object | None) -> str:
    """An account that never finished a sync is (probably) in its first sync: hours for a big mailbox."""
    return FIRST if last_sync_at is None else REGULAR


def to_start(due: Mapping[int, Why], running: Mapping[int, str], lanes: Mapping[int, str], slots: Slots) -> list[int]:
    """The due accounts to start now, most urgent first: not already running, within their lane's free slots.

    `running` maps the accounts syncing now to their lane; `lanes` gives each due account's lane."""
    busy = {FIRST: 0, REGULAR: 0}
    for running_lane in running.values():
        busy[running_lane] += 1
    chosen: list[int] = []
    for account_id in sorted(due, key=lambda a: (due[a], a)):
        if account_id in running:
            continue
        account_lane = lanes.get(account_id, REGULAR)
        if busy[account_lane] < slots.of(account_lane):
            busy[account_lane] += 1
            chosen.append(account_id)
    return chosen


def merge(due: dict[int, Why], account_ids: Iterable[int], why: Why) -> None:
    """Make these accounts due for `why`, keeping a more urgent reason they already have."""
    for account_id in account_ids:
        due[account_id] = min(due.get(account_id, why), why)
