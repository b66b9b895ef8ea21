"""Several nodes on one database (SQLite and PostgreSQL): leases split the accounts evenly, a live node keeps its
accounts, a dead node's accounts move once its leases expire, and a clean stop hands them over at once."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from inboxd.clock import FakeClock, SystemClock
from inboxd.crypto import SecretBox
from inboxd.db_clock import DatabaseClock
from inboxd.leases import Leases, fair_share, renewed
from inboxd.store import Credential, Store

LEASE = timedelta(seconds=30)


def test_fair_share() -> None:
    assert fair_share(4, 2) == 2
    assert fair_share(5, 2) == 3
    assert fair_share(3, 0) == 3
    assert fair_share(0, 3) == 0


def _accounts(engine: sa.Engine, box: SecretBox, clock: FakeClock, n: int) -> list[int]:
    store = Store(engine, clock=clock, secret_box=box)
    return [store.add_account(f"a{i}@example.test", "local", Credential("password", "x")).id for i in range(n)]


def test_two_nodes_split_then_a_dead_nodes_accounts_move(engine: sa.Engine, secret_box: SecretBox) -> None:
    clock = FakeClock()
    ids = _accounts(engine, secret_box, clock, 4)
    a = Leases(engine, clock=clock, node_id="node-a", lease=LEASE)
    b = Leases(engine, clock=clock, node_id="node-b", lease=LEASE)
    assert a.rebalance(ids) == set(ids), "alone, node A takes everything"
    assert b.rebalance(ids) == set(), "nothing is free yet"
    clock.advance(5)
    held_a = a.rebalance(ids)  # sees two live nodes: gives back its surplus
    held_b = b.rebalance(ids)
    assert len(held_a) == len(held_b) == 2
    assert held_a.isdisjoint(held_b)
    for _ in range(3):  # a live node keeps its accounts across renewals
        clock.advance(10)
        a.renew()
        assert b.rebalance(ids) == held_b
    clock.advance(LEASE.total_seconds() + 1)  # node A died: no heartbeat, no renewal
    assert b.rebalance(ids) == set(ids), "the dead node's accounts moved within one lease period"


def test_a_clean_stop_hands_accounts_over_at_once(engine: sa.Engine, secret_box: SecretBox) -> None:
    clock = FakeClock()
    ids = _accounts(engine, secret_box, clock, 2)
    a = Leases(engine, clock=clock, node_id="node-a", lease=LEASE)
    b = Leases(engine, clock=clock, node_id="node-b", lease=LEASE)
    a.rebalance(ids)
    b.rebalance(ids)
    a.release_all()
    assert b.rebalance(ids) == set(ids)


def test_renew_reports_a_lease_that_another_node_took(engine: sa.Engine, secret_box: SecretBox) -> None:
    clock = FakeClock()
    ids = _accounts(engine, secret_box, clock, 1)
    a = Leases(engine, clock=clock, node_id="node-a", lease=LEASE)
    b = Leases(engine, clock=clock, node_id="node-b", lease=LEASE)
    assert a.rebalance(ids) == set(ids)
    clock.advance(LEASE.total_seconds() + 1)  # node A stalled: its lease expired and B took it
    assert b.rebalance(ids) == set(ids)
    assert a.renew() == set(), "A learns that the account is no longer its own"


def test_a_one_off_run_takes_only_free_accounts_and_gives_them_back(engine: sa.Engine, secret_box: SecretBox) -> None:
    """`run --once` next to a daemon: it syncs only accounts no live node holds, and releases them afterwards."""
    clock = FakeClock()
    ids = _accounts(engine, secret_box, clock, 3)
    daemon = Leases(engine, clock=clock, node_id="daemon", lease=LEASE)
    held = daemon.rebalance(ids[:2])
    once = Leases(engine, clock=clock, node_id="once", lease=LEASE)
    taken = once.take(ids)
    assert taken == {ids[2]}
    assert held == set(ids[:2])
    once.release(taken)
    assert daemon.rebalance(ids) == set(ids), "released at once"


def test_a_busy_account_is_not_given_back_until_its_sync_is_over(engine: sa.Engine, secret_box: SecretBox) -> None:
    """A second node joins while the first syncs account 0 (a first sync of hours): the first gives back its surplus
    from the idle accounts, never the busy one, which another node would otherwise sync at the same time."""
    clock = FakeClock()
    ids = _accounts(engine, secret_box, clock, 4)
    a = Leases(engine, clock=clock, node_id="node-a", lease=LEASE)
    b = Leases(engine, clock=clock, node_id="node-b", lease=LEASE)
    assert a.rebalance(ids) == set(ids)
    b.rebalance(ids)  # heartbeat: two live nodes now, a share of 2 each
    held = a.rebalance(ids, busy={ids[3]})
    assert ids[3] in held and len(held) == 2
    assert b.rebalance(ids) == set(ids) - held
    # a share of 2 each, but three syncing on A: A keeps all three until they are over, then gives one back
    assert a.rebalance(ids, busy=held | {ids[0]}) >= held
    assert len(a.rebalance(ids)) == 2


def test_a_node_for_one_account_does_not_take_a_share(engine: sa.Engine, secret_box: SecretBox) -> None:
    """`inboxd run --account X` beside a full node: it syncs X only, and does not count as a live node in the fair
    share, so the full node still holds every other account (it used to drop to half and leave the rest unsynced)."""
    clock = FakeClock()
    ids = _accounts(engine, secret_box, clock, 4)
    full = Leases(engine, clock=clock, node_id="full", lease=LEASE)
    one = Leases(engine, clock=clock, node_id="one", lease=LEASE, member=False)
    assert one.rebalance([ids[2]]) == {ids[2]}
    clock.advance(5)
    assert full.rebalance(ids) == set(ids) - {ids[2]}
    clock.advance(5)
    assert one.rebalance([ids[2]]) == {ids[2]}
    assert full.rebalance(ids) == set(ids) - {ids[2]}


def test_a_node_with_its_clock_ahead_takes_no_live_nodes_lease(engine: sa.Engine, secret_box: SecretBox) -> None:
    """Expiries on the database's clock (DatabaseClock): a node whose own clock runs 35 s ahead, more than a lease,
    neither sees the other node as dead nor its leases as expired. On the nodes' own clocks it took them all."""
    ids = _accounts(engine, secret_box, FakeClock(), 4)
    a = Leases(engine, clock=DatabaseClock(engine, SystemClock()), node_id="node-a", lease=LEASE)
    assert a.rebalance(ids) == set(ids)
    ahead = FakeClock(datetime.now(UTC) + timedelta(seconds=35))
    b = Leases(engine, clock=DatabaseClock(engine, ahead), node_id="node-b", lease=LEASE)
    assert b.rebalance(ids) == set(), "A is alive and holds all four: nothing expired"
    assert a.renew() == set(ids)


def test_renewed_keeps_a_one_off_runs_leases_past_their_period(engine: sa.Engine, secret_box: SecretBox) -> None:
    """`run --once` renews what it took while it syncs: after two lease periods a daemon still cannot take them
    (before, a first sync longer than `sync.lease` lost its account to the daemon, and both wrote it)."""
    ids = _accounts(engine, secret_box, FakeClock(), 2)
    short = timedelta(seconds=2)  # renewed every 0.67 s: a renewal would have to be 1.3 s late to lose it
    once = Leases(engine, clock=SystemClock(), node_id="once", lease=short)
    held = once.take(ids)
    lost: list[bool] = []
    with renewed(once, held, on_lost=lambda: lost.append(True)):
        time.sleep(2 * short.total_seconds())
        daemon = Leases(engine, clock=SystemClock(), node_id="daemon", lease=short)
        assert daemon.rebalance(ids) == set()
    assert not lost
    time.sleep(short.total_seconds() + 0.2)  # no longer renewed: expired
    assert daemon.rebalance(ids) == set(ids)


def test_renewed_reports_a_lease_taken_by_another_node(engine: sa.Engine, secret_box: SecretBox) -> None:
    ids = _accounts(engine, secret_box, FakeClock(), 1)
    short = timedelta(seconds=2)
    once = Leases(engine, clock=SystemClock(), node_id="once", lease=short)
    held = once.take(ids)
    lost = threading.Event()
    with renewed(once, held, on_lost=lost.set):
        with engine.begin() as conn:  # another node took it (its lease had run out meanwhile)
            conn.execute(sa.text("UPDATE inboxd_leases SET node_id = 'other'"))
        assert lost.wait(timeout=5)


def test_a_one_off_run_renewing_its_leases_takes_no_share_from_the_daemons(
    engine: sa.Engine, secret_box: SecretBox
) -> None:
    """`run --once` renews what it took (a non-member Leases): the daemons still count themselves alone, and keep
    every other account. As a member its heartbeat halved the daemon's share, and the rest went unsynced."""
    clock = FakeClock()
    ids = _accounts(engine, secret_box, clock, 5)
    daemon = Leases(engine, clock=clock, node_id="daemon", lease=LEASE)
    assert daemon.rebalance(ids[:4]) == set(ids[:4])
    once = Leases(engine, clock=clock, node_id="once", lease=LEASE, member=False)
    assert once.take(ids) == {ids[4]}
    clock.advance(5)
    assert once.renew() == {ids[4]}
    assert daemon.rebalance(ids) == set(ids[:4])


def test_lease_holders_reads_expiry_on_the_databases_clock(engine: sa.Engine, secret_box: SecretBox) -> None:
    """`inboxd status` (NODE) and `run --once` ("synced by node ...") on a host whose clock is far behind: an expired
    lease is not shown as held, a live one is."""
    behind = FakeClock()  # 2026-01-01: months behind the database
    store = Store(engine, clock=behind, secret_box=secret_box)
    ids = _accounts(engine, secret_box, behind, 2)
    expired = Leases(engine, clock=FakeClock(datetime.now(UTC) - timedelta(minutes=5)), node_id="gone", lease=LEASE)
    expired.take([ids[0]])
    live = Leases(engine, clock=DatabaseClock(engine, SystemClock()), node_id="live", lease=LEASE)
    live.take([ids[1]])
    assert store.lease_holders() == {ids[1]: "live"}
