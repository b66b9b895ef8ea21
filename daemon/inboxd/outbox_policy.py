"""Pure outbox decisions: what happens to an outbox row after an attempt, when a 'sending' row is stale, and how
long the sender may sleep.

The sender (outbox.py) and the daemon's outbox thread apply these; they are tested without SMTP (tests/test_outbox.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum


class Outcome(Enum):
    SENT = "sent"
    TEMPORARY = "temporary"  # 4xx or network before the message was handed over: safe to retry
    AMBIGUOUS = "ambiguous"  # lost after the message was handed over: check \Sent before any retry
    REJECTED = "rejected"  # 5xx: the server will not take it
    DAILY_LIMIT = "daily_limit"  # 5.4.5: the account may not send for a day
    INVALID = "invalid"  # the row itself is wrong (recipients, headers, attachments): never reaches SMTP
    AUTH = "auth"  # credentials refused: wait for the recruiter to reconnect


@dataclass(frozen=True, slots=True)
class RowUpdate:
    status: str
    next_attempt_at: datetime | None
    last_error: str | None
    # set when the whole account must stop sending for a while (daily limit)
    pause_sending_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_delay: timedelta = timedelta(seconds=30)
    max_delay: timedelta = timedelta(hours=1)
    max_attempts: int = 8
    daily_limit_pause: timedelta = timedelta(hours=24)
    stale_after: timedelta = timedelta(minutes=10)  # a 'sending' row older than this was left by a crash
    # after an attempt that may have delivered, the wait before Sent is searched for it: Gmail's search and
    # Exchange's Sent Items can take a few minutes to show a message just accepted
    check_sent_after: timedelta = timedelta(minutes=5)

    def delay(self, attempts: int) -> timedelta:
        """Backoff before attempt `attempts + 1`: first_delay doubling per attempt, capped."""
        delay: timedelta = self.first_delay * (2 ** max(attempts - 1, 0))
        return min(delay, self.max_delay)


def after_attempt(
    outcome: Outcome, *, attempts: int, now: datetime, error: str | None, policy: RetryPolicy
) -> RowUpdate:
    """The row's next state after an attempt that ended with `outcome` (attempts counts this one)."""
    if outcome is Outcome.SENT:
        return RowUpdate("sent", None, None)
    if outcome in (Outcome.REJECTED, Outcome.INVALID):
        return RowUpdate("failed", None, error)
    if outcome is Outcome.DAILY_LIMIT:
        until = now + policy.daily_limit_pause
        return RowUpdate("queued", until, error, pause_sending_until=until)
    if outcome is Outcome.AUTH:
        # not the row's fault: keep it queued, retried once the account is reconnected (or the backoff expires)
        return RowUpdate("queued", now + policy.max_delay, error)
    if attempts >= policy.max_attempts:
        return RowUpdate("failed", None, f"gave up after {attempts} attempts: {error}")
    delay = policy.delay(attempts)
    if outcome is Outcome.AMBIGUOUS:
        delay = max(delay, policy.check_sent_after)
    return RowUpdate("queued", now + delay, error)


def is_stale(claimed_at: datetime | None, now: datetime, policy: RetryPolicy) -> bool:
    """A row in 'sending' whose attempt started long ago was abandoned by a crashed process."""
    return claimed_at is None or now - claimed_at >= policy.stale_after


IDLE_WAIT_CAP = 60.0  # seconds: the sender looks at the table at least this often, whatever it was told
IDLE_WAIT_FLOOR = 0.05  # seconds: never spin, even if a due row cannot be claimed yet (another node's lock)


def idle_wait(next_due: datetime | None, now: datetime) -> float:
    """Seconds the sender may sleep after the queue was drained: until the next row becomes due (`next_due`, from
    OutboxStore.next_due), bounded by IDLE_WAIT_FLOOR and IDLE_WAIT_CAP. New rows wake it earlier (NOTIFY on
    PostgreSQL, data_version on SQLite), so this only bounds how late a retry or a stale claim is picked up."""
    if next_due is None:
        return IDLE_WAIT_CAP
    return min(max((next_due - now).total_seconds(), IDLE_WAIT_FLOOR), IDLE_WAIT_CAP)
