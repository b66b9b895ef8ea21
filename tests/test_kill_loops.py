"""`inboxd run` killed with SIGKILL at random moments, again and again, on SQLite and PostgreSQL: during a first sync
(then one clean `run --once` must leave the database equal to the server) and while sending the outbox (every row
ends delivered at most once, every 'sent' row exactly once, counted by Message-ID in the recipient's INBOX).

CI runs a few kills per test. The long run (each test kills INBOXD_KILL_ITERATIONS times; INBOXD_KILL_SEED replays
a run, the seed is printed at the start of each test):

    INBOXD_KILL_ITERATIONS=200 tests/run tests/test_kill_loops.py -s

Between kills the test only does what time would do: the dead process's lease expires (it would after
`sync.lease`), a row it left in 'sending' becomes stale (after 10 minutes) and retry backoffs run out.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness import MailStack, make_message, wait_for
from harness.config import write_stack_config
from harness.consistency import (
    assert_db_is_prefix_of_server,
    assert_db_matches_server,
    copies_in_inbox,
    postfix_holds_mail_for,
)
from inboxd import db
from inboxd.clock import SystemClock
from inboxd.config import load_config
from inboxd.crypto import SecretBox, init_key_file
from inboxd.store import Credential, Store

pytestmark = pytest.mark.mailstack
INBOXD = str(Path(sys.executable).with_name("inboxd"))
ITERATIONS = os.environ.get("INBOXD_KILL_ITERATIONS")
FIRST_SYNC_KILLS = int(ITERATIONS or 5)
SEND_KILLS = int(ITERATIONS or 8)


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("INBOXD_KILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"INBOXD_KILL_SEED={seed}")
    return random.Random(seed)


def setup_daemon(tmp_path: Path, db_url: str, stack: MailStack, users: list[str]) -> tuple[dict[str, str], sa.Engine]:
    """Config (1 h interval, a short lease, batches of 10) and accounts, as `secrets init` + `accounts add` would
    leave them (in process: every inboxd start costs a second or two)."""
    path = write_stack_config(
        tmp_path, db_url, stack, sync_extra='interval = "1h"\nlease = "3s"', extra='[http]\nlisten = "off"'
    )
    path.write_text(path.read_text().replace("batch_size = 3", "batch_size = 10"))
    config = load_config(path, env={})
    init_key_file(config.secrets.key_file)
    engine = db.create_engine(db_url)
    store = Store(engine, clock=SystemClock(), secret_box=SecretBox.from_key_file(config.secrets.key_file))
    for user in users:
        store.add_account(user, "local", Credential("oauth2_refresh", stack.refresh_token(user)))
    return {**os.environ, "INBOXD_CONFIG": str(path)}, engine


def kill_at_random(env: dict[str, str], log: Path, started: Callable[[], bool], rng: random.Random) -> None:
    """Start `inboxd run`, wait until ``started()`` says it is at work (or 30 s), then SIGKILL it within 1.5 s."""
    with log.open("ab") as err:
        proc = subprocess.Popen([INBOXD, "run"], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not started() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1.5))
        assert proc.poll() is None, f"inboxd run exited by itself ({proc.returncode}):\n{log.read_text()[-3000:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def time_passes(engine: sa.Engine) -> None:
    """What waiting would do after a kill: the dead node's lease and heartbeat expire, a row it left in 'sending'
    is stale (10 minutes), queued rows' backoff is over."""
    past = SystemClock().now() - timedelta(minutes=11)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE inboxd_leases SET expires_at = :t"), {"t": past})
        conn.execute(sa.text("UPDATE inboxd_nodes SET heartbeat_at = :t"), {"t": past})
        conn.execute(sa.text("UPDATE mail_outbox SET claimed_at = :t WHERE status = 'sending'"), {"t": past})
        conn.execute(sa.text("UPDATE mail_outbox SET next_attempt_at = NULL WHERE status = 'queued'"))
        conn.execute(sa.text("UPDATE mail_accounts SET retry_at = NULL"))


def run_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([INBOXD, "run", "--once"], env=env, capture_output=True, text=True, timeout=300, check=False)


def scalar(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


def check_sqlite_file(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.execute(sa.text("PRAGMA integrity_check")).scalar_one() == "ok"


# --- (a) first sync -------------------------------------------------------------------------------------------------


def add_messages(stack: MailStack, user: str, count: int, folder: str, tag: str) -> None:
    messages = [
        make_message(f"c{i}@example.org", user, f"{tag} {i}", f"{tag} {i} " + "x" * (300 + 41 * (i % 13)))
        for i in range(count)
    ]
    with stack.admin_imap(user) as imap:
        for start in range(0, count, 200):
            imap.multiappend(folder, messages[start : start + 200])


def test_first_sync_killed_at_random_moments_ends_equal_to_the_server(
    tmp_path: Path, db_url: str, mailstack: MailStack, rng: random.Random
) -> None:
    """A first sync of 400 messages (two folders, batches of 10) SIGKILLed at a random moment of each run, and run
    again; when a run catches up, more mail arrives for the next one. After every kill the database is a clean
    prefix (no cursor ahead of its rows, nothing twice); after one clean `run --once` it equals the server."""
    user = mailstack.new_user("kill")
    add_messages(mailstack, user, 300, "INBOX", "first")
    add_messages(mailstack, user, 100, "Archive", "archived")
    env, engine = setup_daemon(tmp_path, db_url, mailstack, [user])
    log = tmp_path / "inboxd.log"
    on_server = 400
    for i in range(FIRST_SYNC_KILLS):
        before = scalar(engine, "SELECT count(*) FROM mail_messages")
        if before == on_server:  # caught up: give the next run something to do
            add_messages(mailstack, user, 40, rng.choice(["INBOX", "Archive"]), f"round{i}")
            on_server += 40
        kill_at_random(env, log, lambda: scalar(engine, "SELECT count(*) FROM mail_messages") > before, rng)  # noqa: B023
        assert_db_is_prefix_of_server(engine, mailstack, user)
        time_passes(engine)
    check_sqlite_file(engine)
    done = run_once(env)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = assert_db_matches_server(engine, mailstack, user)
    assert summary.messages == on_server
    print(f"first sync: {FIRST_SYNC_KILLS} kills, {on_server} messages, database equal to the server")
    engine.dispose()


# --- (b) sending ----------------------------------------------------------------------------------------------------


def test_outbox_killed_at_random_moments_delivers_each_row_at_most_once(
    tmp_path: Path, db_url: str, mailstack: MailStack, rng: random.Random
) -> None:
    """30 outbox rows to a candidate on the stack (30 more whenever all are final); `inboxd run` SIGKILLed at a
    random moment of each run while it sends, and started again; then clean runs until every row is final. Every
    'sent' row is in the candidate's INBOX exactly once; a row may instead end 'failed' with "delivery uncertain"
    (killed between the hand-over to SMTP and recording the outcome, on a server that keeps no Sent copy to
    check) and then has at most one copy; no row is lost. The sender's own mailbox (the Sent copies inboxd filed)
    then syncs into the database with no message stored twice."""
    recruiter, candidate = mailstack.new_user("send"), mailstack.new_user("cand")
    env, engine = setup_daemon(tmp_path, db_url, mailstack, [recruiter])

    def queue_rows(count: int) -> None:
        with engine.begin() as conn:
            account_id = conn.execute(sa.text("SELECT id FROM mail_accounts")).scalar_one()
            for i in range(count):
                conn.execute(
                    sa.text(
                        'INSERT INTO mail_outbox (account_id, "to", subject, body_text, idempotency_key) '
                        "VALUES (:a, :to, :s, 'Hello', :k)"
                    ),
                    {"a": account_id, "to": f'["{candidate}"]', "s": f"Offer {i}", "k": uuid.uuid4().hex},
                )

    log = tmp_path / "inboxd.log"
    final = "SELECT count(*) FROM mail_outbox WHERE status IN ('sent', 'failed')"
    total = "SELECT count(*) FROM mail_outbox"
    attempts = "SELECT coalesce(sum(attempts), 0) FROM mail_outbox"
    for _ in range(SEND_KILLS):
        if scalar(engine, final) == scalar(engine, total):  # a long run keeps killing sends, not idle daemons
            queue_rows(30)
        tried = scalar(engine, attempts)
        kill_at_random(env, log, lambda: scalar(engine, attempts) > tried, rng)  # noqa: B023 (called at once)
        time_passes(engine)
    for _ in range(5):  # clean runs until every row is final (each sends what is due; stale rows are checked)
        if scalar(engine, final) == scalar(engine, total):
            break
        clean = run_once(env)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        time_passes(engine)
    check_sqlite_file(engine)
    with engine.connect() as conn:
        outcome = conn.execute(sa.text("SELECT status, last_error, message_id_header FROM mail_outbox")).all()
    assert all(r.status in ("sent", "failed") for r in outcome), [r.status for r in outcome]
    wait_for(lambda: not postfix_holds_mail_for(mailstack, candidate), timeout=60, what="Postfix queue drained")
    copies = copies_in_inbox(mailstack, candidate, [r.message_id_header for r in outcome if r.message_id_header])
    sent = [r for r in outcome if r.status == "sent"]
    uncertain = [r for r in outcome if r.status == "failed"]
    assert all(copies[r.message_id_header] == 1 for r in sent), {
        r.message_id_header: copies[r.message_id_header] for r in sent
    }
    assert all("delivery uncertain" in (r.last_error or "") for r in uncertain), [r.last_error for r in uncertain]
    assert all(copies.get(r.message_id_header or "", 0) <= 1 for r in uncertain)
    arrived = sum(copies.get(r.message_id_header or "", 0) for r in uncertain)
    synced = run_once(env)  # the Sent copies filed by the last runs, into the sender's database
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert_db_matches_server(engine, mailstack, recruiter, allow_unlocated=True)
    print(
        f"outbox: {SEND_KILLS} kills, {len(outcome)} rows, {len(sent)} sent exactly once, "
        f"{len(uncertain)} failed 'delivery uncertain' "
        f"({arrived} of them delivered once, {len(uncertain) - arrived} never), 0 duplicates"
    )
    engine.dispose()
