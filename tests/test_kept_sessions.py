"""inboxd.kept_sessions: the daemon keeps a sync's IMAP session open for the account's next sync, for
`[sync] keep_session`. The rules on fake sessions; then against the real Dovecot (on SQLite and PostgreSQL): the next
sync sends no login and no SELECT, a session the server dropped while kept costs a silent reconnect, and a paused
account's kept session is logged out."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harness import MailStack, make_message
from harness.config import write_stack_config
from inboxd.clock import FakeClock, SystemClock
from inboxd.config import Config, ProviderConfig, load_config
from inboxd.kept_sessions import KeptSessions, still_fresh
from inboxd.metrics import Metrics
from inboxd.planner import Capabilities
from inboxd.runner import Runner
from inboxd.store import Credential, Store
from inboxd.testing import FakeMailbox, FakeSession

KEEP = timedelta(minutes=5)
CAPS = Capabilities(condstore=True, qresync=True)


def provider(host: str = "imap.example.test") -> ProviderConfig:
    return ProviderConfig(
        name="p",
        kind="imap",
        imap_host=host,
        imap_port=993,
        imap_tls="tls",
        smtp_host=None,
        smtp_port=None,
        smtp_tls=None,
        auth="password",
        token_uri=None,
        client_id=None,
        client_secret=None,
        ca_file=None,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 11, 26, 9, 0, tzinfo=UTC))


def session() -> tuple[FakeSession, FakeMailbox]:
    mailbox = FakeMailbox()
    mailbox.add_folder("INBOX")
    return FakeSession(mailbox, CAPS), mailbox


# -- the rules -------------------------------------------------------------------------------------------------


def test_fresh_means_kept_less_than_the_keep_time_ago() -> None:
    at = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    assert still_fresh(at, at, KEEP)
    assert still_fresh(at, at + KEEP - timedelta(seconds=1), KEEP)
    assert not still_fresh(at, at + KEEP, KEEP)
    assert not still_fresh(at, at - timedelta(seconds=1), KEEP), "a clock that went back: not trusted"
    assert not still_fresh(at, at, timedelta(0))


def test_a_kept_session_serves_the_next_sync_until_the_keep_time_runs_out(clock: FakeClock) -> None:
    kept = KeptSessions(clock=clock, keep=KEEP)
    first, mailbox = session()
    kept.put(1, provider(), first)
    assert kept.take(1, provider()) is first
    assert kept.take(1, provider()) is None, "taken: it is the caller's until put back"
    kept.put(1, provider(), first)
    clock.advance(KEEP.total_seconds())
    assert kept.take(1, provider()) is None
    assert mailbox.commands[-1] == "LOGOUT"


def test_a_kept_session_has_no_mailbox_selected(clock: FakeClock) -> None:
    kept = KeptSessions(clock=clock, keep=KEEP)
    used, mailbox = session()
    used.select("INBOX")
    kept.put(1, provider(), used)
    assert mailbox.commands == ["SELECT", "CLOSE"]
    kept.put(1, provider(), kept.take(1, provider()) or used)
    assert mailbox.commands == ["SELECT", "CLOSE"], "nothing selected: nothing to close"


def test_expire_logs_out_only_the_old_ones(clock: FakeClock) -> None:
    kept = KeptSessions(clock=clock, keep=KEEP)
    old, old_box = session()
    kept.put(1, provider(), old)
    clock.advance(180)
    young, young_box = session()
    kept.put(2, provider(), young)
    clock.advance(120)
    assert kept.expire() == 1
    assert old_box.commands == ["LOGOUT"]
    assert young_box.commands == []
    assert kept.take(2, provider()) is young


def test_a_session_for_another_server_is_not_used(clock: FakeClock) -> None:
    """A reloaded config that moved the provider to another host: the kept session is for the old one."""
    kept = KeptSessions(clock=clock, keep=KEEP)
    old, mailbox = session()
    kept.put(1, provider("old.example.test"), old)
    assert kept.take(1, provider("new.example.test")) is None
    assert mailbox.commands == ["LOGOUT"]


def test_keeping_off_logs_out_at_once(clock: FakeClock) -> None:
    kept = KeptSessions(clock=clock, keep=timedelta(0))
    used, mailbox = session()
    kept.put(1, provider(), used)
    assert mailbox.commands == ["LOGOUT"]
    assert len(kept) == 0


def test_sessions_of_accounts_not_synced_here_and_all_at_stop_are_logged_out(clock: FakeClock) -> None:
    kept = KeptSessions(clock=clock, keep=KEEP)
    boxes = {}
    for account_id in (1, 2, 3):
        used, boxes[account_id] = session()
        kept.put(account_id, provider(), used)
    kept.retain({2, 3})
    assert [boxes[a].commands for a in (1, 2, 3)] == [["LOGOUT"], [], []]
    kept.drop(2)
    assert boxes[2].commands == ["LOGOUT"]
    kept.close_all()
    assert boxes[3].commands == ["LOGOUT"]
    assert len(kept) == 0


def test_the_kept_sessions_are_a_metric(clock: FakeClock) -> None:
    kept = KeptSessions(clock=clock, keep=KEEP)
    metrics = Metrics()
    metrics.watch_kept_sessions(kept.__len__)
    assert metrics.registry.get_sample_value("inboxd_imap_sessions_kept") == 0
    kept.put(1, provider(), session()[0])
    kept.put(2, provider(), session()[0])
    assert metrics.registry.get_sample_value("inboxd_imap_sessions_kept") == 2
    kept.close_all()
    assert metrics.registry.get_sample_value("inboxd_imap_sessions_kept") == 0


def test_two_sessions_put_back_for_one_account_keep_one(clock: FakeClock) -> None:
    kept = KeptSessions(clock=clock, keep=KEEP)
    first, first_box = session()
    second, _ = session()
    kept.put(1, provider(), first)
    kept.put(1, provider(), second)
    assert first_box.commands == ["LOGOUT"]
    assert kept.take(1, provider()) is second


# -- the daemon's runner against Dovecot -----------------------------------------------------------------------

# the CONDSTORE-only listener: Dovecot writes a rawlog there, one file per session
HOST = "127.0.0.2"


def config_for(tmp_path: Path, db_url: str, stack: MailStack, extra: str = "") -> Config:
    return load_config(write_stack_config(tmp_path, db_url, stack, host=HOST, extra=extra), env={})


def sessions_seen(stack: MailStack, user: str) -> list[list[str]]:
    """Per IMAP session the server saw for ``user``: its commands (names only)."""
    out = []
    for path in sorted((stack.root / "rawlog" / user).glob("*.in")):
        names = []
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split(" ")
            if len(parts) >= 3 and parts[1] and not parts[1].startswith("{"):
                names.append(parts[2].upper())
        out.append(names)
    return out


def daemon_runner(store: Store, db_url: str, tmp_path: Path, stack: MailStack) -> tuple[str, KeptSessions, Runner]:
    """A new mailbox connected, and a Runner keeping sessions as `inboxd run`'s does."""
    user = stack.new_user()
    store.add_account(user, "local", Credential("oauth2_refresh", stack.refresh_token(user)))
    kept = KeptSessions(clock=SystemClock(), keep=KEEP)
    return user, kept, Runner(config_for(tmp_path, db_url, stack), store, clock=SystemClock(), kept=kept)


@pytest.mark.mailstack
def test_the_next_sync_uses_the_kept_session(store: Store, db_url: str, tmp_path: Path, mailstack: MailStack) -> None:
    user, _, runner = daemon_runner(store, db_url, tmp_path, mailstack)
    mailstack.deliver(user, make_message("cand@example.org", user, "one", "hello"))
    assert [r.ok for r in runner.sync_once()] == [True]
    before = sessions_seen(mailstack, user)
    mailstack.deliver(user, make_message("cand@example.org", user, "two", "hello again"))
    [again] = runner.sync_once()
    assert again.ok and again.stats is not None and again.stats.new_messages == 1
    after = sessions_seen(mailstack, user)
    assert len(after) == len(before), "no new session: the kept one was used"
    second_sync = after[-1][len(before[-1]) :]
    assert "ID" not in second_sync and "LOGOUT" not in second_sync, "no new login, no logout in between"
    assert "CLOSE" in before[-1], "put back with no mailbox selected"
    runner.sync_once()  # nothing changed: one LIST, a STATUS per folder
    third_sync = sessions_seen(mailstack, user)[-1][len(after[-1]) :]
    assert set(third_sync) == {"LIST", "STATUS"}
    assert third_sync.count("LIST") == 1
    runner.close_sessions()
    assert sessions_seen(mailstack, user)[-1][-1] == "LOGOUT"


def kill_imap_processes(stack: MailStack, user: str) -> None:
    """SIGKILL the user's Dovecot imap processes: the connection ends with no BYE (a crash, a lost network)."""
    for line in stack.doveadm("who", "-1", user).splitlines()[1:]:
        pid = line.split()[2]
        os.kill(int(pid), signal.SIGKILL)


@pytest.mark.mailstack
@pytest.mark.parametrize("how", ["kicked", "killed"])
def test_a_kept_session_the_server_dropped_costs_a_silent_reconnect(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, how: str
) -> None:
    """Kicked: the server says BYE; killed: the connection just ends. Either way the next sync reconnects."""
    user, _, runner = daemon_runner(store, db_url, tmp_path, mailstack)
    assert [r.ok for r in runner.sync_once()] == [True]
    if how == "kicked":
        mailstack.doveadm("kick", user)  # the server ends the idle session (as an autologout or a restart would)
    else:
        kill_imap_processes(mailstack, user)
    mailstack.deliver(user, make_message("cand@example.org", user, "after the kick", "hi"))
    [result] = runner.sync_once()
    assert result.ok and result.stats is not None and result.stats.new_messages == 1
    account = store.account(user)
    assert account is not None
    assert (account.state, account.last_error) == ("active", None)
    assert len(sessions_seen(mailstack, user)) == 2
    runner.close_sessions()


@pytest.mark.mailstack
def test_a_paused_accounts_kept_session_is_logged_out(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack
) -> None:
    user, kept, runner = daemon_runner(store, db_url, tmp_path, mailstack)
    runner.sync_once()
    assert len(kept) == 1
    runner.reconfigure(config_for(tmp_path, db_url, mailstack, extra=f'[accounts."{user}"]\npaused = true\n'))
    [result] = runner.sync_once()
    assert result.skipped
    assert len(kept) == 0
    assert sessions_seen(mailstack, user)[-1][-1] == "LOGOUT"
