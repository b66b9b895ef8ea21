"""One sync cycle over every active account, each isolated from the others' failures.

Decides per account whether it runs (config pause, HR-app `enabled`), wires credentials to an IMAP session, runs
AccountSync and records the outcome (state, reason, last_error) in mail_accounts.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from inboxd.clock import Clock
from inboxd.config import Config, ProviderConfig
from inboxd.connections import Connections
from inboxd.errors import (
    AccountFailed,
    InboxdError,
    Interrupted,
    QuotaExceeded,
    ReauthRequired,
    RetryLater,
    SecretsError,
    SessionExpired,
)
from inboxd.imap import ImapSession
from inboxd.kept_sessions import KeptSessions
from inboxd.metrics import Metrics
from inboxd.parsing import MessageParser
from inboxd.scope import Exclusions, contact_set, normalize_address
from inboxd.store import DISCONNECTED_REASON, Account, Store
from inboxd.sync import AccountSync, Progress, SyncSettings, SyncStats

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AccountDecision:
    run: bool
    state: str
    reason: str | None = None
    # a skip that still counts as a failed cycle (`run --once` exits 1): the account needs a human or waits out
    # a provider quota; paused and disabled accounts are decisions, not failures
    failed: bool = False


def decide(account: Account, config: Config, now: datetime) -> AccountDecision:
    """Whether an account syncs this cycle; pure. The HR app's `enabled` wins over the config, then pauses."""
    if not account.enabled:
        # a disconnected mailbox keeps saying so; otherwise the HR app switched it off
        disconnected = account.state_reason == DISCONNECTED_REASON
        reason = DISCONNECTED_REASON if disconnected else "disabled by the HR app (mail_accounts.enabled = false)"
        return AccountDecision(False, "disabled", reason)
    policy = config.policy_for(account.email)
    if policy.paused:
        return AccountDecision(False, "paused", policy.reason or "paused in the config")
    if account.provider not in config.providers:
        return AccountDecision(False, "error", f"provider {account.provider!r} is not in the config", failed=True)
    if account.state == "needs_reauth":
        return AccountDecision(False, "needs_reauth", account.state_reason, failed=True)
    if account.retry_at is not None and now < account.retry_at:
        return AccountDecision(False, account.state, account.state_reason, failed=True)
    return AccountDecision(True, "active")


@dataclass(slots=True)
class AccountResult:
    email: str
    ok: bool
    state: str
    reason: str | None = None
    stats: SyncStats = field(default_factory=SyncStats)
    skipped: bool = False


SessionFactory = Callable[[Account, ProviderConfig], ImapSession]


class Runner:
    """Runs sync cycles; keeps one token source per account so tokens refresh once per expiry, not per poll."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        clock: Clock,
        max_workers: int = 4,
        session_factory: SessionFactory | None = None,
        settings: SyncSettings | None = None,
        sleep: Callable[[float], None] = time.sleep,
        connections: Connections | None = None,
        stop: threading.Event | None = None,
        metrics: Metrics | None = None,
        parser: MessageParser | None = None,
        kept: KeptSessions | None = None,
    ) -> None:
        self._config = config
        self._kept = kept  # None: every sync opens its session and logs out at the end (one-off runs, tests)
        self._parser = parser  # None: each sync parses in its own thread
        # syncs in a row without a message's body (AccountSync._given_up); one entry per account, so no two syncs
        # share a key, and a dict's single item updates are atomic under the GIL
        self._body_misses: dict[tuple[int, str, int, int], int] = {}
        self._bodiless_retried: dict[tuple[int, str, int], float] = {}  # AccountSync._retry_bodiless, the same way
        self._store = store
        self._stop = stop
        # set by the daemon when this node lost an account's lease: the running syncs stop between batches
        self._interrupt = threading.Event()
        self._halt = _AnyEvent(*(e for e in (stop, self._interrupt) if e is not None))
        self._clock = clock
        self.max_workers = max_workers
        self.metrics = metrics or Metrics()
        self.connections = connections or Connections(store, clock=clock, sleep=sleep, metrics=self.metrics)
        self._session_factory = session_factory or self.connections.imap
        self._failures: dict[int, int] = {}  # consecutive transient failures per account (backoff)
        self._fixed_settings = settings is not None  # tests pass their own; the config's otherwise
        self._settings = settings or settings_from(config)

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config (pauses, intervals, scope, providers) from the next account sync on."""
        self._config = config
        if self._kept is not None:
            self._kept.reconfigure(config.sync.keep_session)
        if not self._fixed_settings:
            self._settings = settings_from(config)

    def cycle_settings(self) -> SyncSettings:
        """Settings for one cycle: with scope "contacts", the HR app's contacts as they are now."""
        if self._config.sync.scope == "all":
            return self._settings
        emails = self._store.contact_emails()
        return replace(self._settings, contacts=contact_set(emails), backfill=frozenset(emails))

    def _account_settings(self, account: Account, cycle: SyncSettings) -> SyncSettings:
        """Narrow the cycle's backfill candidates to the contacts this account has not been searched for."""
        if cycle.contacts is None:
            return cycle
        done = self._store.backfilled(account.id)
        return replace(cycle, backfill=frozenset(e for e in cycle.backfill if normalize_address(e) not in done))

    def sync_once(
        self,
        *,
        only: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        account_ids: set[int] | None = None,
    ) -> list[AccountResult]:
        """One cycle over every account (or `only` one, or those in `account_ids`: the ones this node leases)."""
        self._interrupt.clear()
        accounts = self._store.accounts()
        if only is not None:
            accounts = [a for a in accounts if a.email == only.strip().lower()]
        if account_ids is not None:
            accounts = [a for a in accounts if a.id in account_ids]
        if not accounts:
            return []
        settings = self.cycle_settings()
        with ThreadPoolExecutor(
            max_workers=min(self.max_workers, len(accounts)), thread_name_prefix="inboxd-sync"
        ) as pool:
            futures = [pool.submit(self.sync_account, a, _bind(progress, a.email), settings) for a in accounts]
            return [f.result() for f in futures]

    def interrupt(self) -> None:
        """Stop the running syncs between batches (this node lost a lease); cleared by the next sync_once."""
        self._interrupt.set()

    def sync_account(  # noqa: PLR0911 (one return per outcome)
        self,
        account: Account,
        progress: Progress | None = None,
        settings: SyncSettings | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> AccountResult:
        """Sync one account and record the outcome. `stop` ends this sync alone between batches (the daemon sets
        it when this node lost the account's lease); the runner's own stop and interrupt end every sync."""
        halt = self._halt if stop is None else _AnyEvent(self._halt, stop)
        if halt.is_set():  # stopping: do not even connect
            return AccountResult(account.email, ok=True, state=account.state, reason="interrupted", skipped=True)
        decision = decide(account, self._config, self._clock.now())
        if not decision.run:
            if self._kept is not None:
                self._kept.drop(account.id)
            if (account.state, account.state_reason) != (decision.state, decision.reason):
                self._store.set_state(account.id, decision.state, decision.reason, error=account.last_error)
            log.info("sync.account_skipped", account=account.email, state=decision.state, reason=decision.reason)
            return AccountResult(
                account.email, ok=not decision.failed, state=decision.state, reason=decision.reason, skipped=True
            )
        importing = (
            _ImportProgress(self._store, account, self._clock, progress) if account.last_sync_at is None else None
        )
        try:
            settings = self._account_settings(account, settings or self.cycle_settings())
            with structlog.contextvars.bound_contextvars(account=account.email):
                stats = self._sync_with_reconnect(
                    account, settings, importing.report if importing is not None else progress, halt
                )
            if importing is not None:
                importing.record(stats.done, stats.total)  # the import's last numbers, whatever the throttle
            # a successful sync covered these contacts: by the backfill search, or by a first sync that saw all
            done = settings.backfill - stats.backfill_incomplete  # a message found whose body did not come: again
            self._store.mark_backfilled(account.id, (normalize_address(e) for e in done))
        except Interrupted:
            log.info("sync.account_interrupted", account=account.email)
            return AccountResult(account.email, ok=True, state=account.state, reason="interrupted")
        except QuotaExceeded as exc:
            until = self._clock.now() + self._config.sync.quota_pause
            reason = f"provider quota exceeded, IMAP paused until {until.isoformat(timespec='minutes')}: {exc}"
            log.warning("sync.account_quota", account=account.email, until=until.isoformat(), error=str(exc))
            self._store.set_state(account.id, "error", reason, error=str(exc), retry_at=until)
            self.metrics.sync_failed(exc)
            return AccountResult(account.email, ok=False, state="error", reason=reason)
        except ReauthRequired as exc:
            return self._failed(account, "needs_reauth", exc)
        except (AccountFailed, SecretsError) as exc:
            return self._failed(account, "error", exc)
        except RetryLater as exc:
            # Transient: the account stays active; it is tried again after a capped, jittered backoff that grows
            # with consecutive failures (push and HR-table wake-ups included), and the error stays visible.
            failures = self._failures.get(account.id, 0) + 1
            self._failures[account.id] = failures
            retry_at = self._clock.now() + timedelta(seconds=retry_delay(failures))
            return self._failed(account, "active", exc, retry_at=retry_at)
        except InboxdError as exc:
            return self._failed(account, "error", exc)
        except Exception as exc:  # a bug must not stop the other accounts
            log.exception("sync.account_crashed", account=account.email)
            return self._failed(account, "error", exc, reason=f"internal error ({type(exc).__name__})")
        self._failures.pop(account.id, None)
        self._store.set_state(account.id, "active", None, error=None, synced=True)
        self.metrics.sync_succeeded(stats)
        return AccountResult(account.email, ok=True, state="active", stats=stats)

    def _sync_with_reconnect(
        self, account: Account, settings: SyncSettings, progress: Progress | None, halt: _AnyEvent
    ) -> SyncStats:
        """One sync; a session the server ended (Gmail's `BYE Session expired`) is reopened once, silently, and so
        is a kept session that failed in any transient way (the server dropped it while it was idle)."""
        provider = self._config.providers[account.provider]
        kept = self._kept.take(account.id, provider) if self._kept is not None else None
        for attempt in (1, 2):
            session = kept if kept is not None and attempt == 1 else self._session_factory(account, provider)
            done = False
            try:
                stats = AccountSync(
                    self._store,
                    account,
                    session,
                    settings=settings,
                    clock=self._clock,
                    progress=progress,
                    stop=halt,
                    parser=self._parser,
                    body_misses=self._body_misses,
                    bodiless_retried=self._bodiless_retried,
                ).run()
                done = True
                return stats
            except SessionExpired:
                if attempt == 2:
                    raise
                log.info("sync.session_expired_reconnect", account=account.email)
            except RetryLater as exc:
                if session is not kept:
                    raise
                log.info("sync.kept_session_failed_reconnect", account=account.email, error=str(exc))
            finally:
                if done and self._kept is not None and not halt.is_set():
                    self._kept.put(account.id, provider, session)
                else:
                    session.close()
        raise AssertionError("unreachable")

    def expire_sessions(self) -> None:
        """Log out of the kept sessions older than the keep time (the daemon's loop calls this)."""
        if self._kept is not None:
            self._kept.expire()

    def retain_sessions(self, account_ids: set[int]) -> None:
        """Log out of the kept sessions of accounts this node no longer syncs (another node took the lease)."""
        if self._kept is not None:
            self._kept.retain(account_ids)

    def close_sessions(self) -> None:
        if self._kept is not None:
            self._kept.close_all()

    def _failed(
        self,
        account: Account,
        state: str,
        exc: Exception,
        *,
        reason: str | None = None,
        retry_at: datetime | None = None,
    ) -> AccountResult:
        message = reason or str(exc)
        log.warning(
            "sync.account_failed", account=account.email, state=state, error_kind=type(exc).__name__, error=message
        )
        self._store.set_state(
            account.id, state, None if state == "active" else message, error=message, retry_at=retry_at
        )
        self.metrics.sync_failed(exc)
        return AccountResult(account.email, ok=False, state=state, reason=message)


IMPORT_EVERY = 5.0  # seconds between two writes of a first sync's progress to mail_accounts


class _ImportProgress:
    """A mailbox's first sync (its import) reports its progress to the HR app: mail_accounts.import_done and
    import_total, written at most every IMPORT_EVERY seconds (the first report at once: the total known so far)."""

    def __init__(self, store: Store, account: Account, clock: Clock, inner: Progress | None) -> None:
        self._store = store
        self._account = account
        self._clock = clock
        self._inner = inner  # the TTY display of `run --once`, if any
        self._written: float | None = None

    def report(self, done: int, total: int) -> None:
        if self._inner is not None:
            self._inner(done, total)
        now = self._clock.monotonic()
        if self._written is None or now - self._written >= IMPORT_EVERY:
            self._written = now
            self.record(done, total)

    def record(self, done: int, total: int) -> None:
        try:
            self._store.record_import(self._account.id, done, total)
        except sa.exc.SQLAlchemyError as exc:  # a progress figure is not worth failing the sync for
            log.warning("sync.import_progress_failed", account=self._account.email, error=type(exc).__name__)


class _AnyEvent:
    """Set when any of the events is set (what AccountSync polls between batches)."""

    def __init__(self, *events: threading.Event | _AnyEvent) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def retry_delay(failures: int, *, rng: random.Random | None = None) -> float:
    """Seconds before retrying an account after `failures` consecutive transient failures: 15 s doubling,
    capped at 30 min, with jitter so that accounts failing together do not retry together (pure)."""
    ceiling = min(15.0 * 2 ** min(max(failures - 1, 0), 30), 1800.0)  # exponent capped: no overflow
    return (rng or random.Random()).uniform(ceiling / 2, ceiling)


def settings_from(config: Config) -> SyncSettings:
    return SyncSettings(
        batch_size=config.sync.batch_size,
        max_attachment_bytes=config.sync.max_attachment_bytes,
        flag_scan_interval=config.sync.flag_scan_interval,
        exclusions=Exclusions(addresses=config.sync.exclude_addresses, labels=config.sync.exclude_labels),
    )


def _bind(progress: Callable[[str, int, int], None] | None, email: str) -> Progress | None:
    if progress is None:
        return None

    def report(done: int, total: int) -> None:
        progress(email, done, total)

    return report


def summarize(results: list[AccountResult]) -> dict[str, Any]:
    return {
        "accounts": len(results),
        "ok": sum(1 for r in results if r.ok),
        "failed": sum(1 for r in results if not r.ok),
    }
