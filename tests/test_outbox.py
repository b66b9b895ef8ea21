"""The outbox's decisions (pure) and its SQL: atomic claims, Message-ID fixed once, holds, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.models import MailOutbox
from inboxd.outbox_policy import Outcome, RetryPolicy, after_attempt, is_stale
from inboxd.outbox_store import OutboxStore
from inboxd.outbox_wake import SQLITE_POLL_SECONDS, OutboxWake
from inboxd.store import Credential, Store

outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy()


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (Outcome.SENT, "sent"),
        (Outcome.REJECTED, "failed"),
        (Outcome.INVALID, "failed"),
        (Outcome.TEMPORARY, "queued"),
        (Outcome.AMBIGUOUS, "queued"),
        (Outcome.DAILY_LIMIT, "queued"),
        (Outcome.AUTH, "queued"),
    ],
)
def test_outcome_to_status(outcome: Outcome, status: str) -> None:
    assert after_attempt(outcome, attempts=1, now=NOW, error="x", policy=POLICY).status == status


def test_temporary_failures_back_off_then_give_up() -> None:
    delays = [after_attempt(Outcome.TEMPORARY, attempts=n, now=NOW, error="421", policy=POLICY) for n in range(1, 8)]
    waits = [u.next_attempt_at - NOW for u in delays if u.next_attempt_at]
    assert waits == sorted(waits)
    assert waits[0] == timedelta(seconds=30)
    assert max(waits) <= POLICY.max_delay
    last = after_attempt(Outcome.TEMPORARY, attempts=POLICY.max_attempts, now=NOW, error="421 busy", policy=POLICY)
    assert last.status == "failed"
    assert "421 busy" in (last.last_error or "")


def test_daily_limit_pauses_the_account_a_day() -> None:
    update = after_attempt(Outcome.DAILY_LIMIT, attempts=1, now=NOW, error="550 5.4.5", policy=POLICY)
    assert update.pause_sending_until == NOW + timedelta(hours=24)
    assert update.next_attempt_at == update.pause_sending_until


def test_stale_sending_rows() -> None:
    assert is_stale(None, NOW, POLICY)
    assert not is_stale(NOW - timedelta(minutes=1), NOW, POLICY)
    assert is_stale(NOW - POLICY.stale_after, NOW, POLICY)


def _queue(engine: sa.Engine, account_id: int, n: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            outbox_t.insert(),
            [
                {"account_id": account_id, "to": ["c@example.org"], "subject": f"s{i}", "idempotency_key": f"k{i}"}
                for i in range(n)
            ],
        )


@pytest.fixture
def account_id(engine: sa.Engine, secret_box: SecretBox) -> int:
    store = Store(engine, clock=FakeClock(), secret_box=secret_box)
    return store.add_account("rec@example.test", "local", Credential("password", "pw")).id


def test_concurrent_claims_never_share_a_row(engine: sa.Engine, account_id: int) -> None:
    _queue(engine, account_id, 40)
    outbox = OutboxStore(engine, clock=FakeClock(NOW), policy=POLICY)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while (row := outbox.claim_next()) is not None:
            with lock:
                claimed.append(row.id)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed))
    assert len(claimed) == 40
    with engine.connect() as conn:
        assert set(conn.execute(sa.select(outbox_t.c.status)).scalars()) == {"sending"}


def test_message_id_is_fixed_once_and_holds_do_not_count(engine: sa.Engine, account_id: int) -> None:
    _queue(engine, account_id, 1)
    clock = FakeClock(NOW)
    outbox = OutboxStore(engine, clock=clock, policy=POLICY)
    row = outbox.claim_next()
    assert row is not None
    assert row.attempts == 1
    assert outbox.fix_message_id(row.id, "<a@example.test>") == "<a@example.test>"
    assert outbox.fix_message_id(row.id, "<b@example.test>") == "<a@example.test>"
    outbox.hold(row.id, "account paused", NOW + timedelta(minutes=1))
    assert outbox.claim_next() is None, "held until later"
    clock.advance(61)
    again = outbox.claim_next()
    assert again is not None
    assert again.attempts == 1
    assert again.message_id_header == "<a@example.test>"


def test_a_crashed_attempt_is_reclaimed_after_the_stale_timeout(engine: sa.Engine, account_id: int) -> None:
    _queue(engine, account_id, 1)
    clock = FakeClock(NOW)
    outbox = OutboxStore(engine, clock=clock, policy=POLICY)
    assert outbox.claim_next() is not None
    assert outbox.claim_next() is None, "in flight"
    clock.advance(POLICY.stale_after.total_seconds())
    row = outbox.claim_next()
    assert row is not None
    assert row.attempts == 2


def test_an_insert_wakes_the_sender_at_once(engine: sa.Engine, account_id: int) -> None:
    """An INSERT into mail_outbox wakes OutboxWake: on PostgreSQL through the 0005 trigger's NOTIFY, on SQLite
    through PRAGMA data_version (another connection committed). Without a write it sleeps the whole timeout."""
    wake = OutboxWake(engine)
    try:
        started = time.monotonic()
        threading.Timer(0.2, _queue, args=(engine, account_id, 1)).start()
        wake.wait(timeout=10)
        assert time.monotonic() - started < 5, "woken by the insert, not by the timeout"
        started = time.monotonic()
        wake.wait(timeout=0.5)
        assert time.monotonic() - started >= 0.5 - SQLITE_POLL_SECONDS, "nothing written: no early wake-up"
    finally:
        wake.close()


def test_a_slow_worker_whose_claim_was_taken_over_changes_nothing(engine: sa.Engine, account_id: int) -> None:
    """If a live but slow attempt's claim looked stale and another worker took the row, the slow one may not mark,
    send or record: only the current claim's updates apply."""
    _queue(engine, account_id, 1)
    clock = FakeClock(NOW)
    outbox = OutboxStore(engine, clock=clock, policy=POLICY)
    slow = outbox.claim_next()
    assert slow is not None
    clock.advance(POLICY.stale_after.total_seconds())
    fast = outbox.claim_next()
    assert fast is not None
    assert fast.claimed_at != slow.claimed_at
    assert not outbox.mark_uncertain(slow.id, claimed_at=slow.claimed_at), "the slow worker must not send"
    outbox.record(
        slow.id,
        after_attempt(Outcome.REJECTED, attempts=1, now=NOW, error="late", policy=POLICY),
        claimed_at=slow.claimed_at,
    )
    assert outbox.mark_uncertain(fast.id, claimed_at=fast.claimed_at)
    with engine.connect() as conn:
        row = conn.execute(sa.select(outbox_t).where(outbox_t.c.id == fast.id)).one()
    assert (row.status, row.last_error, row.delivery_uncertain) == ("sending", None, True)
