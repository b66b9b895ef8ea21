"""The outbox's decisions (pure) and its SQL: atomic claims, Message-ID fixed once, holds, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa

from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.models import MailOutbox
from inboxd.outbox_policy import (
    IDLE_WAIT_CAP,
    IDLE_WAIT_FLOOR,
    Outcome,
    RetryPolicy,
    after_attempt,
    idle_wait,
    is_stale,
)
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


def test_the_sender_sleeps_until_the_next_row_is_due_within_bounds() -> None:
    assert idle_wait(None, NOW) == IDLE_WAIT_CAP, "nothing waiting: look again after the cap"
    assert idle_wait(NOW + timedelta(seconds=12.5), NOW) == 12.5
    assert idle_wait(NOW + timedelta(hours=1), NOW) == IDLE_WAIT_CAP
    assert idle_wait(NOW, NOW) == IDLE_WAIT_FLOOR, "due now but not claimable (another node's lock): no spinning"
    assert idle_wait(NOW - timedelta(minutes=5), NOW) == IDLE_WAIT_FLOOR


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


def test_next_due_is_when_a_claim_first_succeeds(engine: sa.Engine, account_id: int) -> None:
    """next_due() names the moment claim_next() first finds a row again: a new row at once, a held row when the
    hold ends, an abandoned 'sending' row when its claim turns stale; None when nothing waits. The sender sleeps
    until then, so a time too late would delay mail and one too early would wake it for nothing."""
    clock = FakeClock(NOW)
    outbox = OutboxStore(engine, clock=clock, policy=POLICY)
    assert outbox.next_due() is None
    _queue(engine, account_id, 2)
    assert outbox.next_due() == NOW, "queued without a retry time: due now"
    first = outbox.claim_next()
    second = outbox.claim_next()
    assert first is not None
    assert second is not None
    outbox.hold(first.id, "account paused", NOW + timedelta(seconds=90), claimed_at=first.claimed_at)
    # `second` is left 'sending', as by a crash: stale after POLICY.stale_after (10 min), later than the hold
    assert outbox.next_due() == NOW + timedelta(seconds=90)
    clock.advance(89)
    assert outbox.claim_next() is None, "not due before next_due"
    clock.advance(1)
    again = outbox.claim_next()
    assert again is not None
    assert again.id == first.id
    outbox.record(
        again.id,
        after_attempt(Outcome.SENT, attempts=1, now=clock.now(), error=None, policy=POLICY),
        uncertain=False,
        claimed_at=again.claimed_at,
    )
    stale_at = NOW + POLICY.stale_after
    assert outbox.next_due() == stale_at
    clock.advance((stale_at - clock.now()).total_seconds() - 1)
    assert outbox.claim_next() is None
    clock.advance(1)
    reclaimed = outbox.claim_next()
    assert reclaimed is not None
    assert reclaimed.id == second.id


def test_an_insert_wakes_the_sender_at_once(engine: sa.Engine, account_id: int) -> None:
    """An INSERT into mail_outbox wakes OutboxWake: on PostgreSQL through the 0005 trigger's NOTIFY, on SQLite
    through PRAGMA data_version (another connection committed). Without a write it sleeps the whole timeout."""
    wake = OutboxWake(engine)
    try:
        started = time.monotonic()
        threading.Timer(0.2, _queue, args=(engine, account_id, 1)).start()
        assert wake.wait(timeout=10)
        assert time.monotonic() - started < 5, "woken by the insert, not by the timeout"
        started = time.monotonic()
        assert not wake.wait(timeout=0.5)
        assert time.monotonic() - started >= 0.5 - SQLITE_POLL_SECONDS, "nothing written: no early wake-up"
    finally:
        wake.close()


def test_the_stop_pipe_ends_a_long_wait(engine: sa.Engine) -> None:
    """The sender sleeps until the next retry (up to a minute): the daemon's stop ends that sleep through the
    interrupt pipe, on either database, and a wait already interrupted returns at once too."""
    read_end, write_end = os.pipe()
    wake = OutboxWake(engine, interrupt=read_end)
    try:
        started = time.monotonic()
        threading.Timer(0.2, os.write, args=(write_end, b"x")).start()
        assert not wake.wait(timeout=30), "interrupted: no change reported"
        assert time.monotonic() - started < 10
        started = time.monotonic()
        assert not wake.wait(timeout=30)
        assert time.monotonic() - started < 10, "the pipe stays readable: every later wait ends at once"
    finally:
        wake.close()
        os.close(read_end)
        os.close(write_end)


def test_a_row_made_due_by_an_update_wakes_the_sender(pg_engine: sa.Engine, secret_box: SecretBox) -> None:
    """PostgreSQL: the sender sleeps until the earliest retry it knows of, so a row someone else makes due now (an
    admin's "retry now": next_attempt_at = NULL) must wake it (0010's trigger); inboxd's own updates, which set a
    future retry, must not."""
    store = Store(pg_engine, clock=FakeClock(), secret_box=secret_box)
    account_id = store.add_account("rec@example.test", "local", Credential("password", "pw")).id
    _queue(pg_engine, account_id, 1)
    with pg_engine.begin() as conn:
        conn.execute(sa.text("UPDATE mail_outbox SET next_attempt_at = now() + interval '1 hour'"))
    wake = OutboxWake(pg_engine)
    try:
        wake.wait(timeout=0)  # the insert's own notification
        with pg_engine.begin() as conn:
            conn.execute(sa.text("UPDATE mail_outbox SET next_attempt_at = now() + interval '2 hours'"))
        assert not wake.wait(timeout=0.5), "a retry put off is no news"
        with pg_engine.begin() as conn:
            conn.execute(sa.text("UPDATE mail_outbox SET next_attempt_at = NULL"))
        assert wake.wait(timeout=10), "retry now: woken"
    finally:
        wake.close()


def test_a_lost_listen_connection_raises_instead_of_sleeping_on(pg_engine: sa.Engine) -> None:
    """OutboxWake sleeps in poll(2) on the LISTEN socket (PostgreSQL): when the server ends that connection the
    wait must end with an error (the daemon then polls and listens again), not sleep through its timeout."""
    wake = OutboxWake(pg_engine)
    try:
        assert wake._conn is not None
        backend = wake._conn.info.backend_pid
        with pg_engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            wake.wait(timeout=30)
        assert time.monotonic() - started < 10, "the lost connection ended the wait"
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


def test_a_possible_delivery_waits_minutes_before_sent_is_searched() -> None:
    """Gmail's search and Exchange's Sent Items can take minutes to show a message just accepted: a search 30 s
    after an ambiguous attempt found nothing and the row was sent again."""
    update = after_attempt(Outcome.AMBIGUOUS, attempts=1, now=NOW, error="uncertain", policy=POLICY)
    assert update.next_attempt_at == NOW + POLICY.check_sent_after >= NOW + timedelta(minutes=5)
    temporary = after_attempt(Outcome.TEMPORARY, attempts=1, now=NOW, error="421", policy=POLICY)
    assert temporary.next_attempt_at == NOW + timedelta(seconds=30), "other retries keep their backoff"


def test_a_time_the_hr_app_writes_in_iso_form_comes_due_on_time(engine: sa.Engine, account_id: int) -> None:
    """SQLite compared the times as text: "2026-11-25T11:00:00Z" (the HR app's ISO form) sorted after inboxd's
    "2026-11-25 12:00:00.000000", so a row an hour overdue came due only the next day (and the sender polled
    every 50 ms meanwhile). Any form SQLite reads as a time counts as that time; PostgreSQL parses them anyway."""
    outbox = OutboxStore(engine, clock=FakeClock(NOW), policy=POLICY)
    with engine.begin() as conn:
        for key, when in (("overdue", "2026-11-25T11:00:00Z"), ("offset", "2026-11-25T13:30:00+02:00")):
            conn.execute(
                outbox_t.insert().values(account_id=account_id, to=["c@example.org"], subject=key, idempotency_key=key),
            )
            conn.execute(
                sa.text("UPDATE mail_outbox SET next_attempt_at = :t WHERE idempotency_key = :k"), {"t": when, "k": key}
            )
        conn.execute(
            outbox_t.insert().values(
                account_id=account_id,
                to=["c@example.org"],
                subject="later",
                idempotency_key="later",
                next_attempt_at=NOW + timedelta(minutes=1),
            )
        )
    claimed = [outbox.claim_next(), outbox.claim_next(), outbox.claim_next()]
    assert sorted(r.subject for r in claimed if r is not None) == ["offset", "overdue"], "11:30 UTC and 11:00 UTC"


def test_the_daily_limit_does_not_bring_a_later_row_forward(engine: sa.Engine, account_id: int) -> None:
    """Every queued row of the account was set to now + 24 h, also one the HR app had scheduled three days on."""
    outbox = OutboxStore(engine, clock=FakeClock(NOW), policy=POLICY)
    _queue(engine, account_id, 2)
    later = NOW + timedelta(days=3)
    with engine.begin() as conn:
        conn.execute(outbox_t.update().where(outbox_t.c.idempotency_key == "k1").values(next_attempt_at=later))
    outbox.defer_account(account_id, NOW + timedelta(hours=24), "550 5.4.5 daily limit")
    with engine.connect() as conn:
        times = dict(conn.execute(sa.select(outbox_t.c.idempotency_key, outbox_t.c.next_attempt_at)).all())
    assert times == {"k0": NOW + timedelta(hours=24), "k1": later}


def test_a_final_row_is_never_left_marked_uncertain(engine: sa.Engine, account_id: int) -> None:
    """delivery_uncertain is false on a final row (schema.md): a row that gave up after an attempt that left the
    mark (an internal error, Sent not searchable) kept it."""
    outbox = OutboxStore(engine, clock=FakeClock(NOW), policy=POLICY)
    _queue(engine, account_id, 1)
    row = outbox.claim_next()
    assert row is not None
    assert outbox.mark_uncertain(row.id, claimed_at=row.claimed_at)
    gave_up = after_attempt(Outcome.TEMPORARY, attempts=POLICY.max_attempts, now=NOW, error="x", policy=POLICY)
    outbox.record(row.id, gave_up, uncertain=None, claimed_at=row.claimed_at)
    with engine.connect() as conn:
        assert conn.execute(sa.select(outbox_t.c.status, outbox_t.c.delivery_uncertain)).one() == ("failed", False)
