"""B3, push latency: mail accepted by Postfix (SMTP 250 of our own send) until its row is in mail_messages, with
`inboxd run` on a 1 h interval so only IDLE can bring it in; split at the moment Dovecot shows it in the INBOX.
"""

from __future__ import annotations

import random
import smtplib
import time
import uuid

import sqlalchemy as sa
from imapclient import IMAPClient
from live_common import (
    Daemon,
    MailStack,
    Result,
    latency_results,
    make_message,
    running_daemon,
    scratch_database,
    scratch_dir,
    wait_synced_and_idling,
)

POLL = 0.01  # seconds between database (and INBOX) polls
TIMEOUT = 30.0
TARGETS = {"p50": 1.5, "p95": 3.0}


def run(stack: MailStack, db_kind: str, *, quick: bool) -> list[Result]:
    paced, burst = (15, 5) if quick else (50, 20)
    user = stack.new_user("b3")
    with (
        scratch_dir("b3") as directory,
        scratch_database(db_kind, directory) as url,
        running_daemon(stack, url, [user], directory=directory) as daemon,
        stack.admin_imap(user) as observer,
        smtplib.SMTP(stack.host, stack.smtp_port, timeout=10) as smtp,
    ):
        wait_synced_and_idling(daemon, 1, imap_port=stack.imap_port, timeout=60)
        inbox_count = [int(observer.select_folder("INBOX", readonly=True)[b"EXISTS"])]
        to_inbox, to_row, total = [], [], []
        for _ in range(paced):
            sent, in_inbox, stored = _one(smtp, daemon, observer, user, inbox_count)
            to_inbox.append(in_inbox - sent)
            to_row.append(stored - in_inbox)
            total.append(stored - sent)
            time.sleep(random.uniform(1.0, 2.0))
        bursted = _burst(smtp, daemon, user, burst)
    case = f"{db_kind}, 1 account, paced 1-2 s"
    return [
        *latency_results("B3", case, "smtp 250 -> row", total, TARGETS),
        *latency_results("B3", case, "smtp 250 -> in INBOX (Postfix+LMTP)", to_inbox),
        *latency_results("B3", case, "in INBOX -> row (inboxd)", to_row),
        *latency_results("B3", f"{db_kind}, 1 account, burst of {burst}", "smtp 250 -> row", bursted),
    ]


def _one(
    smtp: smtplib.SMTP, daemon: Daemon, observer: IMAPClient, user: str, inbox_count: list[int]
) -> tuple[float, float, float]:
    """Send one message; the monotonic times of the 250, of its appearance in the INBOX and of its row."""
    message_id = f"b3-{uuid.uuid4().hex}@example.org"
    raw = make_message("sender@example.org", user, "push latency", "x", message_id=f"<{message_id}>")
    smtp.sendmail("sender@example.org", [user], raw)
    sent = time.monotonic()
    deadline = sent + TIMEOUT
    while True:  # Dovecot has it once a NOOP reports one more message
        count = _exists(observer.noop()[1], inbox_count[0])
        if count > inbox_count[0]:
            inbox_count[0] = count
            in_inbox = time.monotonic()
            break
        _check(deadline, daemon, f"{message_id} in the INBOX")
        time.sleep(POLL)
    while not _stored(daemon, [message_id]):
        _check(deadline, daemon, f"{message_id} in mail_messages")
        time.sleep(POLL)
    return sent, in_inbox, time.monotonic()


def _burst(smtp: smtplib.SMTP, daemon: Daemon, user: str, count: int) -> list[float]:
    """`count` messages back to back; each one's 250 -> row."""
    sent: dict[str, float] = {}
    for _ in range(count):
        message_id = f"b3-burst-{uuid.uuid4().hex}@example.org"
        smtp.sendmail(
            "sender@example.org",
            [user],
            make_message("sender@example.org", user, "push burst", "x", message_id=f"<{message_id}>"),
        )
        sent[message_id] = time.monotonic()
    latencies: list[float] = []
    waiting = set(sent)
    deadline = time.monotonic() + TIMEOUT
    while waiting:
        now_stored = _stored(daemon, list(waiting))
        seen = time.monotonic()
        for message_id in now_stored:
            latencies.append(seen - sent[message_id])
        waiting -= now_stored
        if waiting:
            _check(deadline, daemon, f"{len(waiting)} burst messages in mail_messages")
            time.sleep(POLL)
    return latencies


def _stored(daemon: Daemon, message_ids: list[str]) -> set[str]:
    with daemon.store.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT message_id_header FROM mail_messages WHERE message_id_header IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": message_ids},
        )
        return {str(r[0]) for r in rows}


def _exists(responses: list[object], current: int) -> int:
    """The highest `* N EXISTS` in untagged responses, else `current`."""
    counts = [r[0] for r in responses if isinstance(r, tuple) and len(r) == 2 and r[1] == b"EXISTS"]
    return max([current, *counts])


def _check(deadline: float, daemon: Daemon, what: str) -> None:
    daemon.assert_alive()
    if time.monotonic() > deadline:
        raise TimeoutError(f"timed out after {TIMEOUT:.0f} s waiting for {what}")
