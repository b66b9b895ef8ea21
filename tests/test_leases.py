"""Several nodes on one database (SQLite and PostgreSQL): leases split the accounts evenly, a live node keeps its
accounts, a dead node's accounts move once its leases expire, and a clean stop hands them over at once."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.leases import Leases, fair_share
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
