"""Several inboxd nodes on one database: each account is synced by one node at a time, through leases in the
database; accounts are shared out evenly among the live nodes, and a dead node's accounts move within two lease
periods (its leases expire, another node takes them).

Nodes heartbeat in inboxd_nodes; an account's lease (inboxd_leases) is taken or renewed with one conditional
UPDATE (or an INSERT that loses to a concurrent one), so the same statement is safe on PostgreSQL and SQLite.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta

import sqlalchemy as sa
import structlog

from inboxd.clock import Clock
from inboxd.models import AccountLease, Node

log = structlog.get_logger(__name__)

leases_t = AccountLease.__table__  # type: ignore[attr-defined]
nodes_t = Node.__table__  # type: ignore[attr-defined]

LEASE = timedelta(seconds=30)


def fair_share(accounts: int, live_nodes: int) -> int:
    """How many accounts one node should hold (pure): an even split, rounded up so every account has a place."""
    return math.ceil(accounts / max(live_nodes, 1))


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Leases:
    def __init__(
        self,
        engine: sa.Engine,
        *,
        clock: Clock,
        node_id: str | None = None,
        lease: timedelta = LEASE,
        member: bool = True,
    ):
        """`clock` should be the database's (db_clock.DatabaseClock) wherever nodes run on several hosts. A node
        that is not a `member` (`inboxd run --account`) syncs only the accounts it asks for: it does not count
        among the live nodes, so the full nodes still share every account out among themselves."""
        self.engine = engine
        self.node_id = node_id or node_name()
        self._clock = clock
        self.lease = lease
        self._member = member

    def rebalance(self, account_ids: Iterable[int], busy: Iterable[int] = ()) -> set[int]:
        """Heartbeat, renew what we hold, take free or expired leases up to our fair share, give back the surplus
        but never an account in `busy` (syncing on this node now: it is given back once that sync is over).
        Returns the accounts this node may sync until the next call (within one lease period)."""
        wanted = sorted(set(account_ids))
        syncing = set(busy)
        now = self._clock.now()
        expires = now + self.lease
        with self.engine.begin() as conn:
            self._heartbeat(conn, now)
            live = conn.execute(
                sa.select(sa.func.count()).select_from(nodes_t).where(nodes_t.c.heartbeat_at > now - self.lease)
            ).scalar_one()
            share = fair_share(len(wanted), int(live)) if self._member else len(wanted)
            held = set(
                conn.execute(
                    sa.select(leases_t.c.account_id).where(
                        leases_t.c.node_id == self.node_id, leases_t.c.expires_at > now
                    )
                ).scalars()
            )
            held &= set(wanted)
            # the busy ones are kept first; of the surplus, only idle accounts go back
            kept_first = sorted(held, key=lambda a: (a not in syncing, a))
            surplus = [a for a in kept_first[share:] if a not in syncing]
            if surplus:
                conn.execute(
                    leases_t.delete().where(leases_t.c.node_id == self.node_id, leases_t.c.account_id.in_(surplus))
                )
                held -= set(surplus)
            if held:
                conn.execute(
                    leases_t.update()
                    .where(leases_t.c.node_id == self.node_id, leases_t.c.account_id.in_(sorted(held)))
                    .values(expires_at=expires)
                )
        for account_id in wanted:
            if len(held) >= share:
                break
            if account_id not in held and self._take(account_id, now, expires):
                held.add(account_id)
        return held

    def renew(self) -> set[int]:
        """Heartbeat and extend the leases we hold (from the keeper thread, also while a long sync runs);
        returns the accounts still ours (an expired lease may already belong to another node)."""
        now = self._clock.now()
        with self.engine.begin() as conn:
            self._heartbeat(conn, now)
            conn.execute(
                leases_t.update()
                .where(leases_t.c.node_id == self.node_id, leases_t.c.expires_at > now)
                .values(expires_at=now + self.lease)
            )
            return set(
                conn.execute(
                    sa.select(leases_t.c.account_id).where(
                        leases_t.c.node_id == self.node_id, leases_t.c.expires_at > now
                    )
                ).scalars()
            )

    def take(self, account_ids: Iterable[int]) -> set[int]:
        """For `run --once`: every one of these accounts that no live node holds (no fair share, no heartbeat)."""
        now = self._clock.now()
        return {a for a in sorted(set(account_ids)) if self._take(a, now, now + self.lease)}

    def release(self, account_ids: Iterable[int]) -> None:
        ids = sorted(set(account_ids))
        if ids:
            with self.engine.begin() as conn:
                conn.execute(
                    leases_t.delete().where(leases_t.c.node_id == self.node_id, leases_t.c.account_id.in_(ids))
                )

    def release_all(self) -> None:
        """On a clean stop: hand every lease back at once and leave the node list."""
        with self.engine.begin() as conn:
            conn.execute(leases_t.delete().where(leases_t.c.node_id == self.node_id))
            conn.execute(nodes_t.delete().where(nodes_t.c.node_id == self.node_id))

    def _heartbeat(self, conn: sa.Connection, now: object) -> None:
        if not self._member:
            return
        updated = conn.execute(nodes_t.update().where(nodes_t.c.node_id == self.node_id).values(heartbeat_at=now))
        if updated.rowcount == 0:
            conn.execute(nodes_t.insert().values(node_id=self.node_id, heartbeat_at=now))

    def _take(self, account_id: int, now: object, expires: object) -> bool:
        """Take a free or expired lease; False if another live node holds it (or won the race)."""
        try:
            with self.engine.begin() as conn:
                updated = conn.execute(
                    leases_t.update()
                    .where(
                        leases_t.c.account_id == account_id,
                        sa.or_(leases_t.c.node_id == self.node_id, leases_t.c.expires_at <= now),
                    )
                    .values(node_id=self.node_id, expires_at=expires)
                )
                if updated.rowcount == 1:
                    return True
                exists = conn.execute(
                    sa.select(leases_t.c.account_id).where(leases_t.c.account_id == account_id)
                ).first()
                if exists is not None:
                    return False
                conn.execute(leases_t.insert().values(account_id=account_id, node_id=self.node_id, expires_at=expires))
                return True
        except sa.exc.IntegrityError:  # another node inserted the same lease first
            return False


def keep_renewing(
    leases: Leases, stop: threading.Event, held: Callable[[], set[int]], on_lost: Callable[[set[int]], None]
) -> None:
    """Until `stop`: renew this node's leases every third of a lease period. `on_lost` gets the accounts of `held()`
    (read before each renewal: what is taken after it is not in its answer) that another node took, or all of them
    once renewal has failed for 2/3 of a period (by then the leases may be another node's). Never raises: the
    keeper must outlive a database that is away, and a bug (logged)."""
    period = leases.lease.total_seconds()
    last_ok = time.monotonic()
    while not stop.wait(period / 3):
        before = held()
        try:
            still_ours = leases.renew()
        except Exception as exc:
            if isinstance(exc, sa.exc.SQLAlchemyError):
                log.warning("leases.renewal_failed")
            else:
                log.exception("leases.renewal_failed")
            if time.monotonic() - last_ok > period * 2 / 3:
                on_lost(before)
            continue
        last_ok = time.monotonic()
        if before - still_ours:
            log.warning("leases.lost", accounts=len(before - still_ours))
            on_lost(before - still_ours)


@contextlib.contextmanager
def renewed(leases: Leases, held: set[int], on_lost: Callable[[], None]) -> Iterator[None]:
    """Keep `held` renewed for as long as the block runs (`inboxd run --once`: a first sync outlasts a lease many
    times over, and a running daemon would otherwise take the account from under it). `on_lost` is called when one
    of them was lost, or could not be renewed for 2/3 of a period."""
    stop = threading.Event()
    keeper = threading.Thread(
        target=keep_renewing,
        args=(leases, stop, lambda: held, lambda _lost: on_lost()),
        name="inboxd-leases",
        daemon=True,
    )
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join(timeout=5)
