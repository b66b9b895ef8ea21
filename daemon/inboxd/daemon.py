"""`inboxd run`: the long-running service. A full cycle every `sync.interval` over the accounts this node leases
(several nodes share one database, see leases.py); between cycles, an account is synced
at once when its IDLE watcher reports new mail, and everything is re-checked within seconds when the HR app changes
mail_contacts or mail_accounts.enabled. The outbox is served by its own thread, woken by NOTIFY (polling on SQLite).

Signals are turned into events by the caller; this module never exits the process on an error it can retry.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import sqlalchemy as sa
import structlog

from inboxd.blob_gc import GcSchedule
from inboxd.clock import Clock
from inboxd.config import Config, load_config
from inboxd.errors import ConfigError
from inboxd.idle import IdleWatcher
from inboxd.leases import Leases
from inboxd.outbox import Outbox
from inboxd.outbox_wake import OutboxWake
from inboxd.runner import AccountResult, Runner, decide
from inboxd.sdnotify import Notifier
from inboxd.store import Account, Store

log = structlog.get_logger(__name__)

POLL_SECONDS = 5.0  # how often the HR app's tables are checked for changes between cycles


def settle_heap() -> None:
    """After a full cycle: collect, then move every object still alive to the collector's permanent generation
    (gc.freeze), so that the collections set off by each 5 s check no longer walk the daemon's long-lived objects
    (SQLAlchemy's metadata and caches, IMAP sessions, config). Those walks were a third of the idle main thread's
    CPU samples (perf, 200 accounts). Objects frozen earlier are unfrozen first, so cyclic garbage among them is
    collected here, once a cycle, instead of never."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def keep_start_values(running: Config, loaded: Config) -> tuple[list[str], Config]:
    """A reloaded config as the running daemon can apply it: the keys that changed but only a restart applies,
    and ``loaded`` with their running values kept. Those are what `inboxd run` built its parts from at start: the
    database engine, the secrets key, the HTTP listener, the blob store (attachments_dir, also the parser
    processes' directory), the parser processes and the lease holder (sync.lease, whose renewal period must stay
    the lease's)."""
    changed = [
        key
        for key, old, fresh in (
            ("database.url", running.database.url, loaded.database.url),
            ("secrets.key_file", running.secrets.key_file, loaded.secrets.key_file),
            ("http.listen", running.http.listen, loaded.http.listen),
            ("sync.attachments_dir", running.sync.attachments_dir, loaded.sync.attachments_dir),
            ("sync.parse_workers", running.sync.parse_workers, loaded.sync.parse_workers),
            ("sync.parse_time_limit", running.sync.parse_time_limit, loaded.sync.parse_time_limit),
            ("sync.lease", running.sync.lease, loaded.sync.lease),
        )
        if old != fresh
    ]
    # only those keys: the rest of their sections (the HR app's api token, return_to_origins, ...) applies
    sync = replace(
        loaded.sync,
        attachments_dir=running.sync.attachments_dir,
        parse_workers=running.sync.parse_workers,
        parse_time_limit=running.sync.parse_time_limit,
        lease=running.sync.lease,
    )
    http = replace(loaded.http, listen=running.http.listen)
    kept = replace(loaded, database=running.database, secrets=running.secrets, http=http, sync=sync)
    return changed, kept


class Daemon:
    def __init__(
        self,
        config: Config,
        store: Store,
        runner: Runner,
        outbox: Outbox,
        *,
        clock: Clock,
        notifier: Notifier,
        stop: threading.Event,
        reload_requested: threading.Event,
        only: str | None = None,
        outbox_depth: Callable[[], int] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._runner = runner
        self._outbox = outbox
        self._clock = clock
        self._notifier = notifier
        self._stop = stop
        self._reload = reload_requested
        self._only = only.strip().lower() if only else None
        self._outbox_depth = outbox_depth
        self._wakeups: queue.Queue[str] = queue.Queue()
        self._watchers: dict[int, IdleWatcher] = {}
        self._mtime = self._config_mtime()
        self._leases = Leases(store.engine, clock=clock, lease=config.sync.lease)
        self._owned: set[int] = set()
        self._cycle_failed = False  # the last sync raised (the database was away): run the cycle again soon
        self._gc_schedule = GcSchedule(clock)
        self._gc_thread: threading.Thread | None = None
        self._keeper_stop = threading.Event()  # the keeper outlives SIGTERM until syncs are done, then stops
        self._keeper = threading.Thread(target=self._keep_leases, name="inboxd-leases", daemon=True)
        self.sender = threading.Thread(target=self._serve_outbox, name="inboxd-outbox", daemon=True)

    @property
    def config(self) -> Config:
        """The config in force (reloads included)."""
        return self._config

    # -- main loop -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        self._outbox_stop_r, self._outbox_stop_w = os.pipe()  # written at stop: ends the outbox thread's sleep
        self.sender.start()
        self._keeper.start()
        self._notifier.ready("first sync cycle running")
        try:
            while not self._stop.is_set():
                accounts = self._accounts()
                watermark = self._watermark(accounts)
                self._owned = self._rebalance(accounts)
                self._runner.retain_sessions(self._owned)  # log out of the accounts another node took
                self._cycle()
                self._store.sweep_staged_attachments()  # staged by parser processes for runs never stored
                self._collect_attachment_garbage()
                settle_heap()
                self._between_cycles(watermark)
        finally:
            self._shut_down()

    def _collect_attachment_garbage(self) -> None:
        """Once a day (GcSchedule), in a thread of its own: a store of millions of files takes a while to list, and
        the syncs go on meanwhile."""
        if not self._gc_schedule.take(running=self._gc_thread is not None and self._gc_thread.is_alive()):
            return
        self._gc_thread = threading.Thread(
            target=self._store.collect_attachment_garbage, name="inboxd-attachment-gc", daemon=True
        )
        self._gc_thread.start()

    def _between_cycles(self, watermark: object) -> None:
        """Until the next full cycle is due: sync the accounts whose watcher reported news, and check every 5 s
        whether the leases, the config or the HR app's tables changed or a retry fell due (then return early)."""
        watchdog = self._notifier.watchdog_interval  # None without systemd's watchdog: then 5 s, not 2.5 s
        wait_slice = min(POLL_SECONDS, watchdog / 2) if watchdog else POLL_SECONDS
        deadline = time.monotonic() + self._config.sync.interval.total_seconds()
        rebalanced = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._notifier.watchdog()
            self._runner.expire_sessions()
            for email in self._next_wakeups(min(wait_slice, max(deadline - time.monotonic(), 0.01))):
                if self._stop.is_set():
                    return
                self._sync(only=email)
            accounts = self._accounts()  # one read of mail_accounts per tick, for the checks below
            # a node joined or died: take or hand over accounts. Every third of a lease, as the keeper renews:
            # more often would only repeat the keeper's writes, and these checks are most of an idle daemon's CPU
            if time.monotonic() - rebalanced >= self._config.sync.lease.total_seconds() / 3:
                rebalanced = time.monotonic()
                if self._rebalance(accounts) != self._owned:
                    log.info("daemon.leases_changed")
                    return
            if self._reload_due():
                self._reload_config()
                return  # a cycle applies the new config (pauses, scope) at once
            if self._watermark(accounts) != watermark:
                log.info("daemon.hr_tables_changed")
                return
            if self._retry_due(accounts):
                log.info("daemon.retry_due")
                return

    def _shut_down(self) -> None:
        self._notifier.stopping()
        for watcher in self._watchers.values():  # ask all first, then wait: stop stays quick
            watcher.request_stop()
        for watcher in self._watchers.values():
            watcher.stop(timeout=2)
        self._runner.close_sessions()
        os.write(self._outbox_stop_w, b"x")
        self.sender.join(timeout=10)
        if not self.sender.is_alive():  # else it may still poll the pipe: the process is ending anyway
            os.close(self._outbox_stop_r)
            os.close(self._outbox_stop_w)
        self._keeper_stop.set()
        self._keeper.join(timeout=5)
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            self._leases.release_all()  # another node takes over at once, not after the lease expires

    # -- hot reload -----------------------------------------------------------------------------------------

    def _config_mtime(self) -> float | None:
        try:
            return self._config.path.stat().st_mtime if self._config.path else None
        except OSError:
            return None

    def _reload_due(self) -> bool:
        """SIGHUP (systemctl reload), or the config file changed on disk."""
        if self._reload.is_set():
            self._reload.clear()
            return True
        mtime = self._config_mtime()
        return mtime is not None and mtime != self._mtime

    def _reload_config(self) -> None:
        """Read the config again; an invalid one is rejected with the reason and the running one stays."""
        self._mtime = self._config_mtime()
        self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_config(self._config.path, env=os.environ)
        except ConfigError as exc:
            log.error("daemon.reload_rejected", error=str(exc))
            self._notifier.ready(f"config reload rejected: {exc}"[:200])
            return
        except Exception as exc:  # a value no check foresaw (a bug): the running config stays, the daemon runs on
            log.exception("daemon.reload_rejected", error=f"unexpected {type(exc).__name__} reading the config")
            self._notifier.ready(f"config reload rejected: unexpected {type(exc).__name__}")
            return
        restart_needed, new = keep_start_values(self._config, new)
        if restart_needed:
            log.warning("daemon.reload_needs_restart", keys=restart_needed)
        self._config = new
        self._runner.reconfigure(new)
        self._outbox.reconfigure(new)
        log.info("daemon.reloaded", accounts_paused=sum(p.paused for p in new.accounts.values()))
        self._notifier.ready("config reloaded")

    def _cycle(self) -> None:
        self._cycle_failed = False
        results = self._sync(only=self._only)
        ok, failed = sum(r.ok for r in results), sum(not r.ok for r in results)
        log.info("daemon.cycle_done", ok=ok, failed=failed)
        depth: int | str = "unknown"
        if self._outbox_depth is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):  # a status line is not worth stopping for
                depth = self._outbox_depth()
        self._notifier.status(f"{ok} accounts ok, {failed} failed; outbox depth {depth}")
        self._notifier.watchdog()
        if not self._stop.is_set():  # no new IDLE connections while shutting down
            self._refresh_watchers()

    def _sync(self, *, only: str | None) -> list[AccountResult]:
        try:
            return self._runner.sync_once(only=only, progress=self._on_progress, account_ids=self._owned)
        except Exception:  # the database may be away for a moment: log, and the next round tries again
            log.exception("daemon.cycle_failed")
            self._cycle_failed = True
            return []

    def _retry_due(self, accounts: list[Account] | None) -> bool:
        """Whether a cycle should run now rather than an interval later: the last sync failed as a whole, or the
        backoff (retry_at) of an account this node syncs has run out since a transient failure or a quota pause."""
        if self._cycle_failed:
            return True
        if accounts is None:
            return False  # the database is away: the lease check says so
        now = self._clock.now()
        return any(a.id in self._owned and a.retry_at is not None and a.retry_at <= now for a in accounts)

    def _on_progress(self, _email: str, _done: int, _total: int) -> None:
        self._notifier.watchdog()  # a long first sync is alive as long as batches get stored

    def _next_wakeups(self, timeout: float) -> set[str]:
        """Accounts whose IDLE watcher reported a change, waiting at most `timeout` for the first."""
        try:
            emails = {self._wakeups.get(timeout=timeout)}
        except queue.Empty:
            return set()
        while True:
            try:
                emails.add(self._wakeups.get_nowait())
            except queue.Empty:
                return emails

    def _accounts(self) -> list[Account] | None:
        """mail_accounts as it is now; None while the database is away."""
        try:
            return self._store.accounts()
        except sa.exc.SQLAlchemyError:
            return None

    def _watermark(self, accounts: list[Account] | None) -> object:
        """A cheap fingerprint of what the HR app controls: contacts, and which accounts exist and are enabled."""
        if accounts is None:
            return None
        try:
            contacts = self._store.contacts_watermark() if self._config.sync.scope == "contacts" else None
        except sa.exc.SQLAlchemyError:
            return None
        # only what the HR app writes (not `state`, which inboxd itself changes during a cycle)
        return contacts, tuple((a.id, a.enabled) for a in accounts)

    # -- push ------------------------------------------------------------------------------------------------

    # -- leases ------------------------------------------------------------------------------------------------

    def _rebalance(self, accounts: list[Account] | None) -> set[int]:
        """The accounts this node syncs now (its fair share of the leases); none while the database is away, since
        a lease that cannot be renewed may already be another node's."""
        if accounts is not None:
            ids = [a.id for a in accounts if self._only is None or a.email == self._only]
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                return self._leases.rebalance(ids)
        log.warning("daemon.leases_unavailable")
        return set()

    def _keep_leases(self) -> None:
        """Renew held leases every third of a lease period, also while a long sync keeps the main loop busy. A
        lease found lost (or not renewable for 2/3 of a period) interrupts the running syncs between batches, so
        an account is never written by two nodes for longer than one batch."""
        lease = self._config.sync.lease.total_seconds()
        last_ok = time.monotonic()
        while not self._keeper_stop.wait(lease / 3):
            try:
                still_ours = self._leases.renew()
                last_ok = time.monotonic()
                if self._owned - still_ours:
                    log.warning("daemon.lease_lost", accounts=len(self._owned - still_ours))
                    self._runner.interrupt()
            except sa.exc.SQLAlchemyError:
                log.warning("daemon.lease_renewal_failed")
                if time.monotonic() - last_ok > lease * 2 / 3:
                    self._runner.interrupt()

    def _refresh_watchers(self) -> None:
        """One IDLE watcher per account that syncs; stopped for accounts paused, disabled or gone."""
        try:
            accounts = {a.id: a for a in self._store.accounts()}
        except sa.exc.SQLAlchemyError:
            return
        now = self._clock.now()
        wanted = {
            a.id
            for a in accounts.values()
            if decide(a, self._config, now).run
            and (self._only is None or a.email == self._only)
            and a.id in self._owned
        }
        for account_id in set(self._watchers) - wanted:
            self._watchers.pop(account_id).stop(timeout=2)
            gone = accounts.get(account_id)
            log.info("idle.stopped", account=gone.email if gone else account_id, state=gone.state if gone else "gone")
        for account_id in wanted - set(self._watchers):
            self._watchers[account_id] = self._watch(accounts[account_id])

    def _watch(self, account: Account) -> IdleWatcher:
        provider = self._config.providers[account.provider]
        watcher = IdleWatcher(
            account.email,
            lambda: self._runner.connections.imap(account, provider),
            lambda: self._wakeups.put(account.email),
            clock=self._clock,
        )
        watcher.start()
        return watcher

    # -- outbox ------------------------------------------------------------------------------------------------

    def _serve_outbox(self) -> None:
        """Drain the outbox whenever woken: by a new row, or when the next retry falls due. Survives a database
        restart (falls back to polling every second meanwhile)."""
        wake: OutboxWake | None = None
        while not self._stop.is_set():
            failed = False
            try:
                self._outbox.drain(self._stop)
            except Exception:
                log.exception("outbox.drain_failed")
                failed = True
            timeout = 1.0
            if not failed:
                try:
                    timeout = self._outbox.idle_wait()
                except Exception:  # the database away: not the LISTEN connection, which the next block is about
                    log.exception("outbox.drain_failed")
            try:
                if wake is None:
                    wake = OutboxWake(self._store.engine, interrupt=self._outbox_stop_r)
                # asleep until a new row (NOTIFY / data_version), the next retry or the stop; a second after a failure
                wake.wait(timeout=timeout)
            except Exception:  # LISTEN connection lost: poll until it can be reopened
                log.warning("outbox.listen_lost")
                if wake is not None:
                    wake.close()
                wake = None
                self._stop.wait(1.0)
        if wake is not None:
            wake.close()
