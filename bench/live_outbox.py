"""B4, outbox latency: a mail_outbox row inserted (committed) as the HR app does, until the server's 250 (the row's
sent_at, set by inboxd right after it), until the row reads 'sent', and until the mail is in the recipient's INBOX.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from imapclient import IMAPClient
from live_common import (
    Daemon,
    MailStack,
    Result,
    latency_results,
    running_daemon,
    scratch_database,
    scratch_dir,
    wait_synced_and_idling,
)

from inboxd.models import MailOutbox

outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]
POLL = 0.01
TIMEOUT = 30.0


def run(stack: MailStack, db_kind: str, *, quick: bool) -> list[Result]:
    rows = 15 if quick else 40
    recruiter, candidate = stack.new_user("b4rec"), stack.new_user("b4cand")
    to_250, to_sent, to_inbox = [], [], []
    with (
        scratch_dir("b4") as directory,
        scratch_database(db_kind, directory) as url,
        running_daemon(stack, url, [recruiter], directory=directory) as daemon,
    ):
        wait_synced_and_idling(daemon, 1, imap_port=stack.imap_port, timeout=60)
        account = daemon.store.account(recruiter)
        if account is None or account.id is None:
            raise RuntimeError(f"account {recruiter} was not added")
        with stack.admin_imap(candidate) as observer:
            inbox_count = int(observer.select_folder("INBOX", readonly=True)[b"EXISTS"])
            for _ in range(rows):
                accepted, sent, arrived = _one(daemon, account.id, candidate, observer, inbox_count)
                inbox_count += 1
                to_250.append(accepted)
                to_sent.append(sent)
                to_inbox.append(arrived)
                # let the Sent copy and stored copy of the previous mail finish (rows are measured alone); a spread of a
                # whole second puts inserts at a random phase of the SQLite poll, as the HR app's would be
                time.sleep(random.uniform(1.0, 2.0))
    wake = "NOTIFY" if db_kind == "postgresql" else "0.1 s data_version poll"
    case = f"{db_kind} ({wake}), one row at a time"
    return [
        *latency_results("B4", case, "insert -> 250 (sent_at)", to_250, {"p50": 0.5}),
        *latency_results("B4", case, "insert -> row reads sent", to_sent),
        *latency_results("B4", case, "insert -> in recipient INBOX", to_inbox),
    ]


def _one(
    daemon: Daemon, account_id: int, candidate: str, observer: IMAPClient, inbox_count: int
) -> tuple[float, float, float]:
    """Queue one row; seconds from its commit to the 250 (sent_at), to status 'sent' seen, to the INBOX."""
    key = f"b4-{uuid.uuid4().hex}"
    with daemon.store.engine.begin() as conn:
        row_id = conn.execute(
            outbox_t.insert()
            .values(account_id=account_id, to=[candidate], subject=key, body_text="outbox latency", idempotency_key=key)
            .returning(outbox_t.c.id)
        ).scalar_one()
    committed_wall, committed = datetime.now(UTC), time.monotonic()
    deadline = committed + TIMEOUT
    row: Any = None
    sent_seen = arrived = None
    while sent_seen is None or arrived is None:
        if sent_seen is None:
            with daemon.store.engine.connect() as conn:
                row = conn.execute(
                    sa.select(outbox_t.c.status, outbox_t.c.sent_at, outbox_t.c.last_error).where(
                        outbox_t.c.id == row_id
                    )
                ).one()
            if row.status == "sent":
                sent_seen = time.monotonic() - committed
            elif row.status in ("failed", "cancelled"):
                raise RuntimeError(f"outbox row {row_id} ended {row.status}: {row.last_error}")
        if arrived is None:
            responses = observer.noop()[1]
            if any(isinstance(r, tuple) and r[1:] == (b"EXISTS",) and int(r[0]) > inbox_count for r in responses):
                arrived = time.monotonic() - committed
        if time.monotonic() > deadline:
            raise TimeoutError(f"outbox row {row_id}: status {row.status if row else '?'} after {TIMEOUT:.0f} s")
        daemon.assert_alive()
        time.sleep(POLL)
    accepted = (row.sent_at - committed_wall).total_seconds()
    return accepted, sent_seen, arrived
