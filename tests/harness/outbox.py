"""Outbox helpers for tests: the sender wired as `inboxd run` wires it, and a row read back as the HR app sees it."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from inboxd.blobs import BlobStore
from inboxd.clock import Clock, SystemClock
from inboxd.config import Config
from inboxd.connections import Connections
from inboxd.models import MailOutbox
from inboxd.outbox import Outbox
from inboxd.outbox_policy import RetryPolicy
from inboxd.outbox_store import OutboxStore
from inboxd.store import Store

outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]


def make_outbox(config: Config, store: Store, clock: Clock | None = None, policy: RetryPolicy | None = None) -> Outbox:
    """`clock` drives claims and retries (a FakeClock skips backoffs); tokens always use the real clock."""
    clock = clock or SystemClock()
    policy = policy or RetryPolicy()
    return Outbox(
        config,
        store,
        OutboxStore(store.engine, clock=clock, policy=policy),
        Connections(store, clock=SystemClock()),
        BlobStore(config.sync.attachments_dir),
        clock=clock,
        policy=policy,
    )


def outbox_row(store: Store, row_id: int) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(outbox_t).where(outbox_t.c.id == row_id)).one()
