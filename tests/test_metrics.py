"""Metrics and the ops listener: counters move on real sync and outbox runs (fake mailbox, real database), the
database-backed gauges follow mail_accounts and mail_outbox, and /metrics and /healthz answer over HTTP."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from harness import MailStack, wait_for
from harness.config import connect_accounts, write_stack_config
from inboxd import db
from inboxd.blobs import BlobStore
from inboxd.clock import FakeClock
from inboxd.config import Config, ProviderConfig, parse_config
from inboxd.connections import Connections
from inboxd.crypto import SecretBox
from inboxd.errors import RetryLater
from inboxd.http import OpsServer, database_health, start_ops_server
from inboxd.metrics import Metrics
from inboxd.models import MailOutbox
from inboxd.outbox import Outbox
from inboxd.outbox_policy import RetryPolicy
from inboxd.outbox_store import OutboxStore
from inboxd.planner import Capabilities
from inboxd.runner import Runner
from inboxd.smtp import SendResult
from inboxd.store import Account, Credential, Store
from inboxd.sync import SyncStats
from inboxd.testing import FakeMailbox, FakeSession
from inboxd.tokens import OAuthRefreshTokenSource

outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]
CAPS = Capabilities(condstore=True, qresync=True)
CONFIG = """
[sync]
scope = "all"
[providers.gmail]
client_id = "123.apps.googleusercontent.com"
client_secret = "gmail-client-secret"
"""


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def raw_message(n: int) -> bytes:
    return (
        f"From: Cand {n} <cand{n}@example.org>\r\nTo: rec@example.test\r\nSubject: hello {n}\r\n"
        f"Date: Mon, 02 Nov 2026 10:{n:02d}:00 +0000\r\nMessage-ID: <m{n}@example.test>\r\n\r\nbody {n}\r\n"
    ).encode()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse_config(CONFIG, path=tmp_path / "inboxd.toml", env={})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_store(engine: sa.Engine, secret_box: SecretBox, clock: FakeClock, tmp_path: Path) -> Store:
    return Store(engine, clock=clock, secret_box=secret_box, blobs=BlobStore(tmp_path / "attachments"))


# --- counters from the runner -------------------------------------------------------------------------------


def test_a_sync_run_counts_messages_bytes_and_errors_by_kind(
    config: Config, fake_store: Store, clock: FakeClock
) -> None:
    good = fake_store.add_account("good@example.test", "gmail", Credential("password", "x"))
    fake_store.add_account("down@example.test", "gmail", Credential("password", "x"))
    mailbox = FakeMailbox()
    for n in range(3):
        mailbox.append("INBOX", raw_message(n))

    def session(account: Account, _provider: ProviderConfig) -> FakeSession:
        if account.id != good.id:
            raise RetryLater("connection refused")
        return FakeSession(mailbox, CAPS)

    metrics = Metrics()
    runner = Runner(config, fake_store, clock=clock, session_factory=session, metrics=metrics)
    results = {r.email: r for r in runner.sync_once()}
    assert results["good@example.test"].ok and not results["down@example.test"].ok

    assert value(metrics, "inboxd_account_syncs_total", result="ok") == 1
    assert value(metrics, "inboxd_account_syncs_total", result="failed") == 1
    assert value(metrics, "inboxd_messages_synced_total", kind="new") == 3
    assert value(metrics, "inboxd_downloaded_bytes_total") == sum(len(raw_message(n)) for n in range(3))
    assert value(metrics, "inboxd_sync_errors_total", kind="RetryLater") == 1

    mailbox.expunge("INBOX", 1)
    runner.sync_once(only="good@example.test")
    assert value(metrics, "inboxd_messages_synced_total", kind="expunged") == 1
    assert value(metrics, "inboxd_messages_synced_total", kind="new") == 3  # nothing counted twice


def test_account_gauges_follow_the_database_at_scrape_time(config: Config, fake_store: Store, clock: FakeClock) -> None:
    """States, last success and lag are read from mail_accounts when scraped, so lag grows between syncs."""
    synced = fake_store.add_account("synced@example.test", "gmail", Credential("password", "x"))
    paused = fake_store.add_account("off@example.test", "gmail", Credential("password", "x"))
    fake_store.add_account("never@example.test", "gmail", Credential("password", "x"))
    mailbox = FakeMailbox()
    metrics = Metrics()
    metrics.watch(
        fake_store.accounts, OutboxStore(fake_store.engine, clock=clock, policy=RetryPolicy()).depth, clock=clock
    )
    runner = Runner(config, fake_store, clock=clock, session_factory=lambda a, p: FakeSession(mailbox, CAPS))
    runner.sync_account(synced)
    runner.sync_account(paused)
    fake_store.set_state(paused.id, "paused", "leave", synced=False)
    synced_at = clock.now()
    clock.advance(90)

    assert value(metrics, "inboxd_accounts", state="active") == 2
    assert value(metrics, "inboxd_accounts", state="paused") == 1
    assert value(metrics, "inboxd_accounts", state="needs_reauth") == 0  # known states are always exported
    assert value(metrics, "inboxd_account_last_success_timestamp_seconds", account="synced@example.test") == (
        synced_at.timestamp()
    )
    assert value(metrics, "inboxd_account_sync_lag_seconds", account="synced@example.test") == 90
    assert metrics.registry.get_sample_value("inboxd_account_sync_lag_seconds", {"account": "off@example.test"}) is None
    assert (
        metrics.registry.get_sample_value("inboxd_account_sync_lag_seconds", {"account": "never@example.test"}) is None
    )
    assert value(metrics, "inboxd_outbox_depth") == 0


# --- outbox ---------------------------------------------------------------------------------------------


@dataclass
class SlowSender:
    """An SMTP sender that takes `seconds` on the fake clock and accepts every message."""

    clock: FakeClock
    seconds: float

    async def send(self, *, sender: str, recipients: Any, message: bytes) -> SendResult:
        self.clock.advance(self.seconds)
        return SendResult(accepted=tuple(recipients))


class FakeConnections(Connections):
    def __init__(self, store: Store, clock: FakeClock) -> None:
        super().__init__(store, clock=clock)
        self.sender = SlowSender(clock, 2.0)

    def smtp(self, account: Account, provider: ProviderConfig) -> Any:
        return self.sender


def queue(engine: sa.Engine, account_id: int, key: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            outbox_t.insert(),
            {
                "account_id": account_id,
                "to": ["c@example.org"],
                "subject": "hi",
                "body_text": "hello",
                "idempotency_key": key,
            },
        )


def test_outbox_counts_rows_by_outcome_depth_and_send_latency(
    config: Config, fake_store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    sender = fake_store.add_account("rec@example.test", "gmail", Credential("password", "x"))
    disabled = fake_store.add_account("gone@example.test", "gmail", Credential("password", "x"))
    with fake_store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE mail_accounts SET enabled = false WHERE id = :id"), {"id": disabled.id})
    queue(fake_store.engine, sender.id, "a")
    queue(fake_store.engine, disabled.id, "b")
    outbox_store = OutboxStore(fake_store.engine, clock=clock, policy=RetryPolicy())
    metrics = Metrics()
    metrics.watch(fake_store.accounts, outbox_store.depth, clock=clock)
    assert value(metrics, "inboxd_outbox_depth") == 2

    outbox = Outbox(
        config,
        fake_store,
        outbox_store,
        FakeConnections(fake_store, clock),
        BlobStore(tmp_path / "attachments"),
        clock=clock,
        metrics=metrics,
    )
    reports = {r.status for r in outbox.drain()}
    assert reports == {"sent", "held"}
    assert value(metrics, "inboxd_outbox_rows_total", status="sent") == 1
    assert value(metrics, "inboxd_outbox_rows_total", status="held") == 1
    assert value(metrics, "inboxd_outbox_send_seconds_count") == 1
    assert value(metrics, "inboxd_outbox_send_seconds_sum") == 2.0
    assert value(metrics, "inboxd_outbox_send_seconds_bucket", le="1.0") == 0
    assert value(metrics, "inboxd_outbox_send_seconds_bucket", le="2.5") == 1
    assert value(metrics, "inboxd_outbox_depth") == 1  # the held row waits


# --- connections and tokens -----------------------------------------------------------------------------


def test_imap_connections_are_counted_when_opened(
    config: Config, fake_store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = fake_store.add_account("rec@example.test", "gmail", Credential("password", "x"))
    # the adapter's connect() is replaced by the fake session: this test is about the count, not about IMAP
    monkeypatch.setattr("inboxd.connections.connect", lambda *a, **k: FakeSession(FakeMailbox(), CAPS))
    metrics = Metrics()
    connections = Connections(fake_store, clock=clock, metrics=metrics)
    connections.imap(account, config.providers["gmail"]).close()
    connections.imap(account, config.providers["gmail"]).close()
    assert value(metrics, "inboxd_imap_connections_opened_total") == 2


def test_token_refreshes_are_counted_by_result(clock: FakeClock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = Metrics()
    source = OAuthRefreshTokenSource(
        refresh_token="1//refresh",
        client_id="client",
        client_secret="secret",
        token_uri=f"http://127.0.0.1:{port}/token",
        clock=clock,
        on_refresh=metrics.token_refreshed,
    )
    with pytest.raises(RetryLater):
        source.access_token()
    source.close()
    assert value(metrics, "inboxd_token_refreshes_total", result="failed") == 1
    assert value(metrics, "inboxd_token_refreshes_total", result="ok") == 0


# --- HTTP -----------------------------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


@pytest.fixture
def ops(engine: sa.Engine) -> Iterator[OpsServer]:
    metrics = Metrics()
    metrics.sync_succeeded(SyncStats(new_messages=4))
    with OpsServer("127.0.0.1", 0, metrics=metrics, health=database_health(engine)) as server:
        yield server


def test_metrics_and_healthz_answer_on_the_bound_port(ops: OpsServer) -> None:
    assert ops.port != 0
    status, content_type, body = get(ops.port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'inboxd_messages_synced_total{kind="new"} 4.0' in body.decode()
    status, content_type, body = get(ops.port, "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body)["ok"] is True
    assert get(ops.port, "/nope")[0] == 404


def test_the_server_serves_many_requests_and_closes_at_once(engine: sa.Engine) -> None:
    """The ops server sleeps in a selector with a wake-up pipe (no poll interval): requests one after another and
    at the same time are all answered, and close() ends the serving thread at once and frees the port."""
    server = OpsServer("127.0.0.1", 0, metrics=Metrics(), health=database_health(engine)).start()
    try:
        for _ in range(5):
            assert get(server.port, "/healthz")[0] == 200
        answers: list[int] = []
        threads = [threading.Thread(target=lambda: answers.append(get(server.port, "/metrics")[0])) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert answers == [200] * 8
    finally:
        started = time.monotonic()
        server.close()
        server.close()  # a second close does nothing
    assert time.monotonic() - started < 2, "woken by the pipe, not by a timeout"
    assert not server._thread.is_alive()
    with socket.create_server(("127.0.0.1", server.port)):
        pass  # the port is free again


def test_healthz_is_503_with_a_reason_when_the_database_is_away() -> None:
    with socket.socket() as sock:  # a port nobody listens on: the database is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broken = db.create_engine(f"postgresql+psycopg://inboxd:db-password@127.0.0.1:{port}/inboxd")
    try:
        with OpsServer("127.0.0.1", 0, metrics=Metrics(), health=database_health(broken)) as server:
            status, _, body = get(server.port, "/healthz")
    finally:
        broken.dispose()
    assert status == 503
    answer = json.loads(body)
    assert answer["ok"] is False
    assert answer["reason"] == "database unreachable (OperationalError)"
    assert b"db-password" not in body
    assert str(port).encode() not in body  # no connection details at all


def test_healthz_is_503_when_a_side_thread_died(engine: sa.Engine) -> None:
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    with OpsServer("127.0.0.1", 0, metrics=Metrics(), health=database_health(engine, threads={"outbox": dead})) as s:
        status, _, body = get(s.port, "/healthz")
    assert status == 503
    assert json.loads(body)["reason"] == "the outbox thread has stopped"


def test_healthz_is_200_before_the_side_threads_are_started(engine: sa.Engine) -> None:
    """`inboxd run` opens the listener a moment before the daemon starts its threads: not started is not dead."""
    waiting = threading.Thread(target=lambda: None)
    with OpsServer("127.0.0.1", 0, metrics=Metrics(), health=database_health(engine, threads={"outbox": waiting})) as s:
        status, _, _ = get(s.port, "/healthz")
    assert status == 200


def test_listen_off_serves_nothing_and_a_busy_port_is_logged_not_fatal(engine: sa.Engine) -> None:
    health = database_health(engine)
    assert start_ops_server(None, metrics=Metrics(), health=health) is None
    with OpsServer("127.0.0.1", 0, metrics=Metrics(), health=health) as busy, structlog.testing.capture_logs() as logs:
        assert start_ops_server(("127.0.0.1", busy.port), metrics=Metrics(), health=health) is None
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["http.listen_failed"]


def test_ipv6_loopback_listener(engine: sa.Engine) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        server = OpsServer("::1", 0, metrics=Metrics(), health=database_health(engine))
    except OSError:
        pytest.skip("::1 is not configured")
    with server:
        conn = http.client.HTTPConnection("::1", server.port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
        finally:
            conn.close()


# --- the daemon -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _try_get(port: int, path: str) -> tuple[int, str] | None:
    try:
        status, _, body = get(port, path)
    except OSError:
        return None
    return status, body.decode()


@pytest.mark.mailstack
def test_inboxd_run_serves_metrics_and_healthz_until_sigterm(tmp_path: Path, db_url: str, mailstack: MailStack) -> None:
    """The real daemon against Dovecot and the OAuth server: one sync shows up as counters and gauges."""
    inboxd = str(Path(sys.executable).with_name("inboxd"))
    recruiter = mailstack.new_user("metrics")
    port = _free_port()
    config = write_stack_config(
        tmp_path, db_url, mailstack, sync_extra='interval = "1h"', extra=f'[http]\nlisten = "127.0.0.1:{port}"\n'
    )
    env = connect_accounts(config, mailstack, [recruiter], inboxd)
    proc = subprocess.Popen([inboxd, "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        health = wait_for(lambda: _try_get(port, "/healthz"), timeout=20, what="/healthz")
        assert health[0] == 200
        assert json.loads(health[1])["ok"] is True

        def synced() -> str | None:
            # the cycle's sync, then at once the IDLE watcher's catch-up sync: polling can miss the moment the
            # counter reads 1.0 (it goes 0 -> 1 -> 2 within tens of ms), so any count of successful syncs counts
            answer = _try_get(port, "/metrics")
            text = answer[1] if answer else ""
            ok = re.search(r'^inboxd_account_syncs_total\{result="ok"\} (\S+)$', text, re.MULTILINE)
            return text if ok is not None and float(ok.group(1)) >= 1 else None

        text = wait_for(synced, timeout=20, what="a successful sync in /metrics")
        assert f'inboxd_account_last_success_timestamp_seconds{{account="{recruiter}"}}' in text
        assert 'inboxd_accounts{state="active"} 1.0' in text
        assert 'inboxd_token_refreshes_total{result="ok"} 1.0' in text
        # one connection for the sync, one for the IDLE watcher that pushes new mail
        opened = re.search(r"^inboxd_imap_connections_opened_total (\S+)$", text, re.MULTILINE)
        assert opened is not None
        assert float(opened.group(1)) >= 1
        assert "inboxd_outbox_depth 0.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert _try_get(port, "/healthz") is None  # the listener closed with the daemon
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_scheduler_gauges_read_at_scrape() -> None:
    """`inboxd_syncs_running{lane}`, `inboxd_syncs_due` and `inboxd_syncs_stalled` ask the daemon's scheduler at
    every scrape."""
    running = {"first": 1, "regular": 3}
    due, stalled = [5], [0]
    metrics = Metrics()
    metrics.watch_schedule(running.__getitem__, lambda: due[0], lambda: stalled[0])
    sample = metrics.registry.get_sample_value
    assert sample("inboxd_syncs_running", {"lane": "first"}) == 1
    assert sample("inboxd_syncs_running", {"lane": "regular"}) == 3
    assert sample("inboxd_syncs_due") == 5
    assert sample("inboxd_syncs_stalled") == 0
    running["first"], due[0], stalled[0] = 2, 0, 1
    assert sample("inboxd_syncs_running", {"lane": "first"}) == 2
    assert sample("inboxd_syncs_due") == 0
    assert sample("inboxd_syncs_stalled") == 1
