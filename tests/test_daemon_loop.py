"""`inboxd run` (the looping daemon) as a real process: a contact the HR app adds is backfilled within seconds,
not at the next interval, and SIGTERM stops it cleanly."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import time
import uuid
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dbs import PG_URL
from harness import MailStack, make_message, wait_for
from harness.config import connect_accounts, write_stack_config
from inboxd import db
from inboxd.daemon import settle_heap
from inboxd.models import MailMessage

pytestmark = pytest.mark.mailstack
messages_t = MailMessage.__table__  # type: ignore[attr-defined]
INBOXD = str(Path(sys.executable).with_name("inboxd"))


def test_new_contact_is_backfilled_within_seconds_and_sigterm_stops(
    tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    recruiter = mailstack.new_user("loop")
    config = write_stack_config(tmp_path, db_url, mailstack, scope="contacts", sync_extra='interval = "1h"')
    env = connect_accounts(config, mailstack, [recruiter], INBOXD)
    mailstack.deliver(recruiter, make_message("Cand <new.cand@example.org>", recruiter, "old application", "x"))
    engine = db.create_engine(db_url)
    proc = subprocess.Popen([INBOXD, "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _synced_once(engine, recruiter), timeout=20, what="first cycle")
        with engine.begin() as conn:  # the HR app adds the candidate
            conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('new.cand@example.org')"))
        added = time.monotonic()
        wait_for(lambda: _count(engine) == 1, timeout=20, what="backfilled message")
        assert time.monotonic() - added < 15, "noticed within seconds, not at the 1 h interval"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        engine.dispose()


def _synced_once(engine: sa.Engine, email: str) -> bool:
    with engine.connect() as conn:
        return (
            conn.execute(sa.text("SELECT last_sync_at FROM mail_accounts WHERE email = :e"), {"e": email}).scalar()
            is not None
        )


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(messages_t)).scalar_one())


def test_push_new_mail_reaches_the_database_within_seconds_and_disable_stops_it(
    tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """`inboxd run` with a 1 h interval: mail delivered through Postfix is in mail_messages within seconds (IDLE),
    and the HR app's enabled = false turns the account 'disabled' within seconds too; true again resumes it."""
    recruiter = mailstack.new_user("push")
    config = write_stack_config(
        tmp_path, db_url, mailstack, sync_extra='interval = "1h"', extra='[http]\nlisten = "off"'
    )
    mailstack.deliver(recruiter, make_message("c@example.org", recruiter, "before", "x"))
    env = connect_accounts(config, mailstack, [recruiter], INBOXD)
    engine = db.create_engine(db_url)
    proc = subprocess.Popen([INBOXD, "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _count(engine) == 1, timeout=20, what="first cycle")
        time.sleep(1.0)  # the IDLE watcher is up shortly after the first cycle
        sent = time.monotonic()
        mailstack.deliver(recruiter, make_message("c@example.org", recruiter, "pushed", "x"), wait=False)
        wait_for(lambda: _count(engine) == 2, timeout=20, what="pushed message stored")
        assert time.monotonic() - sent < 10, "pushed by IDLE, not the 1 h interval"
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE mail_accounts SET enabled = false WHERE email = :e"), {"e": recruiter})
        wait_for(lambda: _state(engine, recruiter) == "disabled", timeout=20, what="disabled within seconds")
        mailstack.deliver(recruiter, make_message("c@example.org", recruiter, "while disabled", "x"))
        time.sleep(2)
        assert _count(engine) == 2, "nothing synced while disabled"
        with engine.begin() as conn:  # access restored: resumes from the saved cursors, no reconnect needed
            conn.execute(sa.text("UPDATE mail_accounts SET enabled = true WHERE email = :e"), {"e": recruiter})
        wait_for(lambda: _count(engine) == 3, timeout=20, what="resumed within seconds")
        wait_for(lambda: _state(engine, recruiter) == "active", timeout=10, what="state active again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        engine.dispose()


def _state(engine: sa.Engine, email: str) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT state FROM mail_accounts WHERE email = :e"), {"e": email}).scalar())


def test_sigterm_during_a_long_first_sync_stops_within_seconds_and_loses_nothing(
    tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """SIGTERM in the middle of a first sync: the batch in flight is committed, the process exits 0 within 10 s,
    and the next run continues from the cursor to exactly one row per message."""
    recruiter = mailstack.new_user("term")
    total = 3000
    with mailstack.admin_imap(recruiter) as imap:
        msgs = [make_message(f"c{i}@example.org", recruiter, f"m{i}", "x" * 500) for i in range(total)]
        for i in range(0, total, 500):
            imap.multiappend("INBOX", msgs[i : i + 500])
    config = write_stack_config(
        tmp_path, db_url, mailstack, sync_extra='interval = "1h"\nbatch_size = 10', extra='[http]\nlisten = "off"'
    )
    config.write_text(config.read_text().replace("batch_size = 3\n", ""))
    env = connect_accounts(config, mailstack, [recruiter], INBOXD)
    engine = db.create_engine(db_url)
    proc = subprocess.Popen([INBOXD, "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _count(engine) >= 50, timeout=30, what="first batches stored")
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - stopped < 10
        assert _count(engine) < total, "stopped in the middle, not after the whole first sync"
        done = subprocess.run([INBOXD, "run", "--once"], env=env, capture_output=True, check=False)
        assert done.returncode == 0
        assert _count(engine) == total
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        engine.dispose()


def test_config_reload_pauses_an_account_and_rejects_an_invalid_config(
    tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """Editing the config pauses and resumes a user within seconds (no restart); an invalid edit plus SIGHUP is
    rejected with a log line naming the key, and the daemon keeps running on the old config."""
    recruiter = mailstack.new_user("reload")
    config = write_stack_config(
        tmp_path, db_url, mailstack, sync_extra='interval = "1h"', extra='[http]\nlisten = "off"'
    )
    original = config.read_text()
    env = connect_accounts(config, mailstack, [recruiter], INBOXD)
    engine = db.create_engine(db_url)
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen([INBOXD, "run"], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: _synced_once(engine, recruiter), timeout=20, what="first cycle")
        config.write_text(original + f'\n[accounts."{recruiter}"]\npaused = true\nreason = "left the company"\n')
        wait_for(lambda: _state(engine, recruiter) == "paused", timeout=20, what="paused by the edited config")
        config.write_text(original)  # the admin removes the pause again
        wait_for(lambda: _state(engine, recruiter) == "active", timeout=20, what="resumed by the edited config")
        config.write_text(original + f'\n[accounts."{recruiter}"]\npaused = true\nreason = "left the company"\n')
        wait_for(lambda: _state(engine, recruiter) == "paused", timeout=20, what="paused again")
        config.write_text(original.replace('imap_tls = "starttls"', 'imap_tls = "sometimes"'))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "daemon.reload_rejected" in log.read_text(), timeout=20, what="reload rejected")
        assert "imap_tls" in log.read_text()
        # a value that once overflowed deep inside the validation and ended the daemon
        config.write_text(original.replace('interval = "1h"', 'interval = "9999999999d"'))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "sync.interval" in log.read_text(), timeout=20, what="second reload rejected")
        time.sleep(0.5)
        assert proc.poll() is None, "still running on the previous config"
        assert _state(engine, recruiter) == "paused"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        engine.dispose()


def test_two_nodes_split_the_accounts_and_a_killed_node_hands_them_over(tmp_path: Path, mailstack: MailStack) -> None:
    """Two `inboxd run` processes on one PostgreSQL: the accounts are split between them, mail is stored for all,
    and after SIGKILL of one node the other takes its accounts over within two lease periods and stores their mail."""
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    db_url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    users = [mailstack.new_user(f"node{i}") for i in range(4)]
    config = write_stack_config(
        tmp_path, db_url, mailstack, sync_extra='interval = "1h"\nlease = "2s"', extra='[http]\nlisten = "off"'
    )
    env = connect_accounts(config, mailstack, users, INBOXD, upgrade=True)
    engine = db.create_engine(db_url)
    nodes = [
        subprocess.Popen([INBOXD, "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    try:
        wait_for(lambda: _lease_split(engine) == [2, 2], timeout=30, what="accounts split 2/2")
        for user in users:
            mailstack.deliver(user, make_message("c@example.org", user, f"to {user}", "x"), wait=False)
        wait_for(lambda: _count(engine) == 4, timeout=30, what="mail stored for every account")
        nodes[0].kill()  # SIGKILL: no chance to hand anything over
        nodes[0].wait()
        wait_for(lambda: _lease_split(engine) == [4], timeout=30, what="the survivor holds every account")
        for user in users:
            mailstack.deliver(user, make_message("c@example.org", user, f"again {user}", "x"), wait=False)
        wait_for(lambda: _count(engine) == 8, timeout=30, what="mail stored after the takeover")
        nodes[1].send_signal(signal.SIGTERM)
        assert nodes[1].wait(timeout=15) == 0
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _lease_split(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT count(*) FROM inboxd_leases WHERE expires_at > now() GROUP BY node_id ORDER BY 1")
        ).scalars()
        return [int(r) for r in rows]


def test_run_once_skips_an_account_a_live_node_is_syncing(tmp_path: Path, db_url: str, mailstack: MailStack) -> None:
    """`inboxd run --once` next to a daemon: the account another node holds a lease on is reported and left alone,
    the free one is synced, and the one-off run gives its lease back."""
    busy, free = mailstack.new_user("busy"), mailstack.new_user("free")
    config = write_stack_config(tmp_path, db_url, mailstack, extra='[http]\nlisten = "off"')
    env = connect_accounts(config, mailstack, [busy, free], INBOXD)
    for user in (busy, free):
        mailstack.deliver(user, make_message("c@example.org", user, "hello", "x"))
    engine = db.create_engine(db_url)
    try:
        with engine.begin() as conn:  # a daemon on another host holds `busy`
            conn.execute(
                sa.text(
                    "INSERT INTO inboxd_leases (account_id, node_id, expires_at) "
                    "SELECT id, 'other-host:1:abc', :until FROM mail_accounts WHERE email = :e"
                ),
                {"e": busy, "until": datetime.now(UTC) + timedelta(minutes=5)},
            )
        done = subprocess.run([INBOXD, "run", "--once"], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        busy_line = next(line for line in done.stdout.splitlines() if line.startswith(busy))
        assert "synced by node other-host:1:abc" in busy_line
        assert _count(engine) == 1, "only the free account was synced"
        with engine.connect() as conn:
            holders = conn.execute(sa.text("SELECT node_id FROM inboxd_leases")).scalars().all()
        assert holders == ["other-host:1:abc"], "the one-off run released its own lease"
    finally:
        engine.dispose()


def test_settle_heap_freezes_the_living_and_still_collects_cycles_among_them() -> None:
    """settle_heap() (after each full cycle) moves live objects out of the collector's reach (gc.freeze), but a
    frozen object that later becomes cyclic garbage is collected by the next settle_heap, not kept forever."""

    class Node:
        other: object = None

    first, second = Node(), Node()
    first.other, second.other = second, first  # a cycle, alive while we hold `first`
    probe = weakref.ref(second)
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        del first, second  # now cyclic garbage, frozen: an ordinary collection does not see it
        gc.collect()
        assert probe() is not None
        settle_heap()
        assert probe() is None, "unfrozen and collected at the next settle"
    finally:
        gc.unfreeze()
