"""Per-account isolation in the runner: a transient failure backs that account off (capped, jittered) while the
others sync; success resets the backoff (SQLite and PostgreSQL, fake sessions, injected clock)."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from inboxd.clock import FakeClock
from inboxd.config import ProviderConfig, parse_config
from inboxd.crypto import SecretBox
from inboxd.errors import RetryLater
from inboxd.imap import ImapSession
from inboxd.planner import Capabilities
from inboxd.runner import Runner, decide, retry_delay
from inboxd.store import DISCONNECTED_REASON, Account, Credential, Store
from inboxd.testing import FakeMailbox, FakeSession


def test_retry_delay_grows_caps_and_jitters() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, rng=rng) for n in range(1, 12)]
    assert 7.5 <= delays[0] <= 15
    assert all(d <= 1800 for d in delays)
    assert delays[-1] >= 900
    assert len({round(retry_delay(3), 3) for _ in range(20)}) > 1, "jittered"


def test_a_failing_account_backs_off_while_the_others_sync(
    engine: sa.Engine, secret_box: SecretBox, tmp_path: Path
) -> None:
    config = parse_config(
        '[sync]\nscope = "all"\n[providers.local]\nkind = "imap"\nimap_host = "127.0.0.1"\nimap_tls = "plain"\n',
        path=tmp_path / "inboxd.toml",
        env={},
    )
    clock = FakeClock()
    store = Store(engine, clock=clock, secret_box=secret_box)
    good = store.add_account("good@example.test", "local", Credential("password", "x"))
    bad = store.add_account("bad@example.test", "local", Credential("password", "x"))
    attempts: dict[str, int] = {"good@example.test": 0, "bad@example.test": 0}
    broken = {"bad@example.test"}

    def sessions(account: Account, _provider: ProviderConfig) -> ImapSession:
        attempts[account.email] += 1
        if account.email in broken:
            raise RetryLater("connection refused")
        return FakeSession(FakeMailbox(), Capabilities(True, True))

    runner = Runner(config, store, clock=clock, session_factory=sessions)
    results = {r.email: r for r in runner.sync_once()}
    assert results[good.email].ok and not results[bad.email].ok
    failed = store.account(bad.email)
    assert failed is not None
    assert failed.state == "active"
    assert failed.retry_at is not None
    assert clock.now() < failed.retry_at <= clock.now() + timedelta(seconds=15)
    runner.sync_once()
    assert attempts == {"good@example.test": 2, "bad@example.test": 1}, "backed off; the other account synced"
    clock.advance(16)
    broken.clear()
    results = {r.email: r for r in runner.sync_once()}
    assert results[bad.email].ok
    recovered = store.account(bad.email)
    assert recovered is not None
    assert recovered.retry_at is None


def test_interrupt_stops_a_running_sync_between_batches(
    engine: sa.Engine, secret_box: SecretBox, tmp_path: Path
) -> None:
    """What the daemon does when this node loses an account's lease: the sync stops after the batch in flight."""
    config = parse_config(
        '[sync]\nscope = "all"\nbatch_size = 2\n[providers.local]\nkind = "imap"\nimap_host = "127.0.0.1"\n'
        'imap_tls = "plain"\n',
        path=tmp_path / "inboxd.toml",
        env={},
    )
    clock = FakeClock()
    store = Store(engine, clock=clock, secret_box=secret_box)
    store.add_account("long@example.test", "local", Credential("password", "x"))
    mailbox = FakeMailbox()
    for n in range(10):
        mailbox.append("INBOX", f"Message-ID: <l{n}@x>\r\nFrom: a@b.example\r\nSubject: {n}\r\n\r\nx\r\n".encode())
    runner = Runner(
        config, store, clock=clock, session_factory=lambda *_: FakeSession(mailbox, Capabilities(True, True))
    )

    def lose_lease_after_first_batch(_email: str, done: int, _total: int) -> None:
        if done >= 2:
            runner.interrupt()

    [result] = runner.sync_once(progress=lose_lease_after_first_batch)
    assert result.reason and "interrupted" in result.reason
    with store.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM mail_messages")).scalar_one()
    assert stored == 2, "the first batch was committed, then the sync stopped"
    [again] = runner.sync_once()
    assert again.ok and again.stats.new_messages == 8, "the next sync continues from the cursor"


def test_decide_keeps_the_disconnected_reason_apart_from_the_hr_apps_switch(tmp_path: Path) -> None:
    config = parse_config("", path=tmp_path / "inboxd.toml", env={})
    now = FakeClock().now()

    def account(state: str, reason: str | None) -> Account:
        return Account(1, "a@x.test", "gmail", False, state, reason, None, None, None)

    assert decide(account("disabled", DISCONNECTED_REASON), config, now).reason == DISCONNECTED_REASON
    switched_off = decide(account("active", None), config, now)
    assert (switched_off.run, switched_off.state) == (False, "disabled")
    assert switched_off.reason == "disabled by the HR app (mail_accounts.enabled = false)"
