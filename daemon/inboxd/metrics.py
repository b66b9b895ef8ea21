"""Prometheus metrics: one `Metrics` object per process, counted by the runner, outbox, connections and token sources.

Counters move where things happen; account states, sync lag and outbox depth are read from the database at scrape
time (`watch`), so they are true for the whole cluster and never stale.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inboxd.schedule import FIRST, REGULAR

if TYPE_CHECKING:
    from prometheus_client import Metric

    from inboxd.clock import Clock
    from inboxd.store import Account
    from inboxd.sync import SyncStats

log = structlog.get_logger(__name__)

# always exported (0 when empty) so dashboards and alerts see a stable set of series
ACCOUNT_STATES = ("active", "error", "needs_reauth", "paused", "disabled")
# accounts inboxd is not syncing on purpose: no lag is reported for them
IDLE_STATES = frozenset({"paused", "disabled"})
# seconds from claim to sent: one SMTP round trip plus a Sent copy; minutes when a server is slow
SEND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Every inboxd_* metric, in its own registry (tests make a fresh one; nothing is process-global)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.syncs = Counter(
            "inboxd_account_syncs", "Account sync runs by result (ok, failed).", ["result"], registry=r
        )
        self.messages = Counter(
            "inboxd_messages_synced",
            "Messages handled by the sync, by kind: new, remapped (UIDVALIDITY), expunged, quarantined.",
            ["kind"],
            registry=r,
        )
        self.bytes = Counter("inboxd_downloaded_bytes", "Message bytes downloaded over IMAP.", registry=r)
        self.sync_errors = Counter(
            "inboxd_sync_errors", "Failed account syncs, by exception class name.", ["kind"], registry=r
        )
        self.token_refreshes = Counter(
            "inboxd_token_refreshes", "OAuth access token refreshes, by result (ok, failed).", ["result"], registry=r
        )
        self.imap_connections = Counter(
            "inboxd_imap_connections_opened", "Authenticated IMAP connections opened.", registry=r
        )
        self.outbox_rows = Counter(
            "inboxd_outbox_rows",
            "Outbox rows processed, by what the row became: sent, queued (retry), held, failed.",
            ["status"],
            registry=r,
        )
        self.send_seconds = Histogram(
            "inboxd_outbox_send_seconds",
            "Seconds from claiming an outbox row to the message being sent and stored.",
            buckets=SEND_BUCKETS,
            registry=r,
        )
        for result in ("ok", "failed"):  # both series exist from the start, so rate() works on the first failure
            self.syncs.labels(result)
            self.token_refreshes.labels(result)
        for kind in ("new", "remapped", "expunged", "quarantined"):
            self.messages.labels(kind)

    # -- hooks ------------------------------------------------------------------------------------------------

    def sync_succeeded(self, stats: SyncStats) -> None:
        self.syncs.labels("ok").inc()
        self.messages.labels("new").inc(stats.new_messages)
        self.messages.labels("remapped").inc(stats.remapped)
        self.messages.labels("expunged").inc(stats.expunged)
        self.messages.labels("quarantined").inc(stats.quarantined)
        self.bytes.inc(stats.bytes_downloaded)

    def sync_failed(self, exc: BaseException) -> None:
        self.syncs.labels("failed").inc()
        self.sync_errors.labels(type(exc).__name__).inc()

    def token_refreshed(self, ok: bool) -> None:
        self.token_refreshes.labels("ok" if ok else "failed").inc()

    def imap_connected(self) -> None:
        self.imap_connections.inc()

    def outbox_row_done(self, status: str, seconds: float) -> None:
        self.outbox_rows.labels(status).inc()
        if status == "sent":
            self.send_seconds.observe(max(seconds, 0.0))

    # -- database-backed gauges ------------------------------------------------------------------------------

    def watch_kept_sessions(self, count: Callable[[], int]) -> None:
        """`inboxd_imap_sessions_kept`: sync sessions open and idle for their account's next sync, read on scrape."""
        gauge = Gauge(
            "inboxd_imap_sessions_kept",
            "IMAP sessions kept open after a sync for the account's next one (sync.keep_session).",
            registry=self.registry,
        )
        gauge.set_function(lambda: float(count()))

    def watch_schedule(self, running: Callable[[str], int], due: Callable[[], int], stalled: Callable[[], int]) -> None:
        """`inboxd_syncs_running{lane}`, `inboxd_syncs_due` and `inboxd_syncs_stalled`: the daemon's scheduler
        (inboxd.schedule), read on scrape."""
        gauge = Gauge(
            "inboxd_syncs_running",
            "Account syncs running now, by lane (first: accounts that never finished a sync).",
            ["lane"],
            registry=self.registry,
        )
        for lane in (FIRST, REGULAR):
            gauge.labels(lane=lane).set_function(functools.partial(_count, running, lane))
        Gauge(
            "inboxd_syncs_due",
            "Accounts due to sync, waiting for a free slot or for their running sync to end.",
            registry=self.registry,
        ).set_function(lambda: float(due()))
        Gauge(
            "inboxd_syncs_stalled",
            "Account syncs running with no batch stored for sync.stall_after (a read or a lock that never returns).",
            registry=self.registry,
        ).set_function(lambda: float(stalled()))

    def watch(self, accounts: Callable[[], list[Account]], outbox_depth: Callable[[], int], *, clock: Clock) -> None:
        """Export account states, last success, lag and outbox depth, read at every scrape."""
        self.registry.register(_DatabaseCollector(accounts, outbox_depth, clock))

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class _DatabaseCollector(Collector):
    def __init__(self, accounts: Callable[[], list[Account]], outbox_depth: Callable[[], int], clock: Clock) -> None:
        self._accounts = accounts
        self._outbox_depth = outbox_depth
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []  # not described up front: collect() needs the database, registration must not

    def collect(self) -> Iterator[Metric]:
        try:
            accounts = self._accounts()
            depth = self._outbox_depth()
        except Exception as exc:  # /metrics still answers with the counters; /healthz reports the database
            log.warning("metrics.database_unavailable", error_kind=type(exc).__name__)
            return
        now = self._clock.now()
        states = GaugeMetricFamily("inboxd_accounts", "Connected mailboxes by state.", labels=["state"])
        counts = dict.fromkeys(ACCOUNT_STATES, 0)
        for account in accounts:
            counts[account.state] = counts.get(account.state, 0) + 1
        for state, n in counts.items():
            states.add_metric([state], n)
        yield states
        last = GaugeMetricFamily(
            "inboxd_account_last_success_timestamp_seconds",
            "Unix time of the account's last successful sync.",
            labels=["account"],
        )
        lag = GaugeMetricFamily(
            "inboxd_account_sync_lag_seconds",
            "Seconds since the account's last successful sync (not reported for paused or disabled accounts).",
            labels=["account"],
        )
        for account in accounts:
            if account.last_sync_at is None:
                continue
            last.add_metric([account.email], account.last_sync_at.timestamp())
            if account.state not in IDLE_STATES:
                lag.add_metric([account.email], max((now - account.last_sync_at).total_seconds(), 0.0))
        yield last
        yield lag
        yield GaugeMetricFamily("inboxd_outbox_depth", "Outbox rows waiting or being sent (queued + sending).", depth)


def _count(count: Callable[[str], int], lane: str) -> float:
    return float(count(lane))
