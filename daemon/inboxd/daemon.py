"""`inboxd run`: the long-running service. Each account this node leases (several nodes share one database, see
leases.py) syncs on its own, in a pool: every `sync.interval`, at once when its IDLE watcher reports new mail,
within seconds when the HR app changes mail_contacts or mail_accounts.enabled, and when a backoff runs out. The
loop never waits for a sync (schedule.py decides which due accounts start): a first sync of hours holds one slot of
its lane, not the node. The outbox is served by its own thread, woken by NOTIFY (polling on SQLite).

Signals are turned into events by the caller; this module never exits the process on an error it can retry.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime

import sqlalchemy as sa
import structlog

from inboxd.blob_gc import GcSchedule
from inboxd.clock import Clock
from inboxd.config import MAX_PARALLEL_SYNCS, Config, load_config
from inboxd.db_clock import DatabaseClock
from inboxd.errors import ConfigError
from inboxd.idle import IdleWatcher
from inboxd.leases import Leases, keep_renewing
from inboxd.outbox import Outbox
from inboxd.outbox_wake import OutboxWake
from inboxd.runner import AccountResult, Runner, decide
from inboxd.schedule import Slots, Why, lane, merge, to_start
from inboxd.sdnotify import Notifier
from inboxd.store import Account, Store

log = structlog.get_logger(__name__)

POLL_SECONDS = 5.0  # the loop's longest wait: how often the HR app's tables, the config and stalls are checked
STOP_WAIT = 6.0  # at a stop, how long the syncs get to end between batches (systemd's TimeoutStopSec is 15 s)


@dataclass(slots=True)
class _Sync:
    """An account's sync running in the pool."""

    future: Future[AccountResult]
    lane: str
    stop: threading.Event  # set when this node lost the account's lease
    round_no: int
    progress: _Progress
    email: str
    stalled: bool = False  # daemon.sync_stalled was logged


@dataclass(slots=True)
class _Progress:
    """When a sync last stored a batch (or started): what tells a stalled sync (sync.stall_after)."""

    at: float = field(default_factory=time.monotonic)

    def report(self, _done: int, _total: int) -> None:
        self.at = time.monotonic()


@dataclass(slots=True)
class _Seen:
    """What the loop remembers of an account between its syncs (only the loop's thread reads or writes it)."""

    started_at: datetime | None = None  # when its last sync began: a retry_at after it is a backoff run out
    attempted: bool = False  # a sync of it ended in this process: it gets an IDLE watcher
    retry_soon_at: float | None = None  # monotonic: its last sync raised as a whole (the database away)


@dataclass(slots=True)
class _Round:
    """A sync.interval round: the accounts still to sync in it, and the outcomes so far."""

    number: int
    pending: set[int]
    ok: int = 0
    failed: int = 0


def settle_heap() -> None:
    """After a round: collect, then move every object still alive to the collector's permanent generation
    (gc.freeze), so that the collections set off by each 5 s check no longer walk the daemon's long-lived objects
    (SQLAlchemy's metadata and caches, IMAP sessions, config). Those walks were a third of the idle main thread's
    CPU samples (perf, 200 accounts). Objects frozen earlier are unfrozen first, so cyclic garbage among them is
    collected here, once a round, instead of never."""
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
        # account ids from the IDLE watchers (a push), None when a sync ended: both wake the loop at once
        self._wakeups: queue.Queue[int | None] = queue.Queue()
        self._watchers: dict[int, IdleWatcher] = {}
        self._mtime = self._config_mtime()
        # expiries and heartbeats on the database's clock: the nodes' own clocks may disagree
        self._leases = Leases(
            store.engine,
            clock=DatabaseClock(store.engine, clock),
            lease=config.sync.lease,
            member=self._only is None,
        )
        # what the keeper thread changes too (a lost lease) is guarded by _lock: the owned accounts, the due ones
        # and the running syncs
        self._lock = threading.Lock()
        self._owned: set[int] = set()
        self._due: dict[int, Why] = {}
        self._running: dict[int, _Sync] = {}
        # threads are made as needed up to both lanes' maximum: a reload may raise the slots (schedule.to_start
        # keeps to them, the pool never queues)
        self._pool = ThreadPoolExecutor(max_workers=2 * MAX_PARALLEL_SYNCS, thread_name_prefix="inboxd-sync")
        self._seen: dict[int, _Seen] = {}  # by account id; an account gone from mail_accounts is forgotten
        runner.metrics.watch_schedule(self._running_in, lambda: len(self._due), self._stalled)
        self._round: _Round | None = None
        self._round_no = 0
        self._round_at = 0.0  # monotonic time of the next sync.interval round: the first at once
        self._round_started = 0.0
        self._leases_known = False  # the first round waits for the first lease check (the database may be away)
        self._rebalance_at = 0.0
        self._seen_watermark: object = None
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
                self._tick()
                self._wait()
        finally:
            self._shut_down()

    def _tick(self) -> None:
        """One turn of the loop (at least every 5 s, and at once after a push or a finished sync): collect the
        finished syncs, work out which accounts are due and why, and start those that have a free slot. Nothing
        here waits for a sync, so pushes, the HR app's changes, reloads, leases and the watchdog are served while
        any account (a first sync of hours) is syncing."""
        self._notifier.watchdog()
        self._runner.expire_sessions()
        self._reap()
        self._check_stalls()
        accounts = self._accounts()  # one read of mail_accounts per turn, for the checks below
        if accounts is not None and time.monotonic() >= self._rebalance_at:
            # a node joined or died: take or hand over accounts. Every third of a lease, as the keeper renews:
            # more often would only repeat the keeper's writes, and these checks are most of an idle daemon's CPU
            self._rebalance_at = time.monotonic() + self._config.sync.lease.total_seconds() / 3
            self._apply_leases(accounts)
        if self._reload_due():
            self._reload_config()
            self._make_due(self._owned, Why.CHANGED)  # pauses and scope apply at once
        watermark = self._watermark(accounts)
        if watermark is not None:
            if self._seen_watermark is not None and watermark != self._seen_watermark:
                log.info("daemon.hr_tables_changed")
                self._make_due(self._owned, Why.CHANGED)
            self._seen_watermark = watermark
        if self._leases_known and time.monotonic() >= self._round_at:
            self._start_round()
        if accounts is not None:
            self._forget_gone(accounts)
            self._make_due(self._retries_due(accounts), Why.RETRY)
            self._refresh_watchers(accounts)
            self._start_due(accounts)
        if self._round is not None:
            with self._lock:
                self._round.pending &= self._owned  # an account whose lease went to another node is not waited for
            if not self._round.pending:
                self._finish_round()

    def _wait(self) -> None:
        """Until a watcher pushes, a sync ends, or a slice of the poll period passes; pushes become due."""
        watchdog = self._notifier.watchdog_interval  # None without systemd's watchdog: then 5 s, not 2.5 s
        wait_slice = min(POLL_SECONDS, watchdog / 2) if watchdog else POLL_SECONDS
        self._make_due(self._next_wakeups(wait_slice), Why.PUSH)

    def _make_due(self, account_ids: set[int], why: Why) -> None:
        """These accounts sync as soon as they have a slot (those this node still holds)."""
        with self._lock:
            merge(self._due, account_ids & self._owned, why)

    def _running_in(self, lane_name: str) -> int:
        with self._lock:
            return sum(1 for s in self._running.values() if s.lane == lane_name)

    def _start_round(self) -> None:
        """Every sync.interval: every account this node syncs is due, and the round's outcome is logged once all
        of them have synced (daemon.cycle_done). A round still unfinished an interval later (a first sync longer
        than the interval, accounts queued behind the first-sync lane) is logged, and the housekeeping it would
        have done is done now, so that it never waits for more than an interval."""
        if self._round is not None:
            log.info("daemon.round_unfinished", pending=len(self._round.pending))
            self._housekeeping()
        self._round_started = time.monotonic()
        self._round_at = self._round_started + self._config.sync.interval.total_seconds()
        self._round_no += 1
        with self._lock:
            self._round = _Round(self._round_no, set(self._owned))
            merge(self._due, self._owned, Why.ROUND)

    def _finish_round(self) -> None:
        with self._lock:  # the keeper's _drop_accounts reads it under the lock
            assert self._round is not None
            ok, failed = self._round.ok, self._round.failed
            self._round = None
        log.info("daemon.cycle_done", ok=ok, failed=failed)
        depth: int | str = "unknown"
        if self._outbox_depth is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):  # a status line is not worth stopping for
                depth = self._outbox_depth()
        self._notifier.status(f"{ok} accounts ok, {failed} failed; outbox depth {depth}")
        self._housekeeping()

    def _housekeeping(self) -> None:
        self._store.sweep_staged_attachments()  # staged by parser processes for runs never stored
        self._collect_attachment_garbage()
        settle_heap()

    def _start_due(self, accounts: list[Account]) -> None:
        """Start the due accounts that have a free slot in their lane (schedule.to_start)."""
        by_id = {a.id: a for a in accounts}
        with self._lock:
            for account_id in [a for a in self._due if a not in self._owned or a not in by_id]:
                del self._due[account_id]  # the lease went to another node, or the account is gone
                if self._round is not None:
                    self._round.pending.discard(account_id)
            running = {a: s.lane for a, s in self._running.items()}
            lanes = {a: lane(by_id[a].last_sync_at) for a in self._due}
            slots = Slots(first=self._config.sync.parallel_first_syncs, regular=self._config.sync.parallel_syncs)
            chosen = to_start(self._due, running, lanes, slots)
        if not chosen:
            return
        try:
            settings = self._runner.cycle_settings()  # the HR app's contacts as they are now, for scope "contacts"
        except sa.exc.SQLAlchemyError:
            log.warning("daemon.sync_deferred", accounts=len(chosen), error="database unavailable")
            return
        with self._lock:
            for account_id in chosen:
                why = self._due.pop(account_id, None)
                if why is None or account_id not in self._owned:  # the keeper dropped it meanwhile (lease lost)
                    continue
                stop, watch = threading.Event(), _Progress()
                future = self._pool.submit(
                    self._runner.sync_account, by_id[account_id], watch.report, settings, stop=stop
                )
                self._running[account_id] = _Sync(
                    future, lanes[account_id], stop, self._round_no, watch, by_id[account_id].email
                )
                self._seen.setdefault(account_id, _Seen()).started_at = self._clock.now()
                future.add_done_callback(lambda _f: self._wakeups.put(None))  # the loop collects it at once
                log.debug("daemon.sync_started", account=by_id[account_id].email, why=why.name.lower())

    def _reap(self) -> None:
        """Collect the syncs that ended: count them in their round; a sync that could not even record its outcome
        (the database away) is tried again after a poll period."""
        with self._lock:
            finished = {a: s for a, s in self._running.items() if s.future.done()}
            for account_id in finished:
                del self._running[account_id]
        for account_id, sync in finished.items():
            seen = self._seen.setdefault(account_id, _Seen())
            seen.attempted = True
            try:
                ok = sync.future.result().ok
            except Exception:  # the database may be away for a moment: log, and try again soon
                log.exception("daemon.sync_failed")
                ok = False
                seen.retry_soon_at = time.monotonic() + POLL_SECONDS
            if self._round is not None and sync.round_no == self._round.number and account_id in self._round.pending:
                self._round.pending.discard(account_id)
                self._round.ok += ok
                self._round.failed += not ok

    def _check_stalls(self) -> None:
        """A sync with no batch stored for sync.stall_after (a read or a database lock that never returns) holds its
        slot and its account: logged once (daemon.sync_stalled) and counted (inboxd_syncs_stalled). The loop itself
        goes on, so systemd's watchdog does not see it; a restart frees the slot."""
        now, stall_after = time.monotonic(), self._config.sync.stall_after.total_seconds()
        with self._lock:
            fresh = [s for s in self._running.values() if not s.stalled and now - s.progress.at >= stall_after]
            for sync in fresh:
                sync.stalled = True
        for sync in fresh:
            log.warning("daemon.sync_stalled", account=sync.email, minutes=round((now - sync.progress.at) / 60))

    def _stalled(self) -> int:
        with self._lock:
            return sum(1 for s in self._running.values() if s.stalled)

    def _forget_gone(self, accounts: list[Account]) -> None:
        """Drop what the loop remembers of accounts no longer in mail_accounts (removed, or forgotten for GDPR)."""
        present = {a.id for a in accounts}
        with self._lock:
            running = set(self._running)
        for account_id in set(self._seen) - present - running:
            del self._seen[account_id]

    def _retries_due(self, accounts: list[Account]) -> set[int]:
        """The owned accounts whose backoff (retry_at) has run out since their last sync began, and those whose
        last sync failed as a whole a poll period ago."""
        now, mono = self._clock.now(), time.monotonic()
        soon = {a for a, s in self._seen.items() if s.retry_soon_at is not None and s.retry_soon_at <= mono}
        for account_id in soon:
            self._seen[account_id].retry_soon_at = None
        with self._lock:
            owned = set(self._owned)
        expired = set()
        for account in accounts:
            if account.id not in owned or account.retry_at is None or account.retry_at > now:
                continue
            started_at = self._seen[account.id].started_at if account.id in self._seen else None
            if started_at is None or started_at < account.retry_at:
                expired.add(account.id)
        if expired:
            log.info("daemon.retry_due", accounts=len(expired))
        return (soon & owned) | expired

    def _collect_attachment_garbage(self) -> None:
        """Once a day (GcSchedule), in a thread of its own: a store of millions of files takes a while to list, and
        the syncs go on meanwhile."""
        if not self._gc_schedule.take(running=self._gc_thread is not None and self._gc_thread.is_alive()):
            return
        self._gc_thread = threading.Thread(
            target=self._store.collect_attachment_garbage, name="inboxd-attachment-gc", daemon=True
        )
        self._gc_thread.start()

    def _shut_down(self) -> None:
        """Stop: the syncs end between batches (their stop is the daemon's), the watchers and the outbox thread
        are asked to stop, and the leases go back so that another node takes over at once. Within TimeoutStopSec
        (15 s): the syncs get STOP_WAIT, then the process exits without waiting for a sync stuck in a read."""
        self._notifier.stopping()
        for watcher in self._watchers.values():  # ask all first, then wait: stop stays quick
            watcher.request_stop()
        os.write(self._outbox_stop_w, b"x")
        with self._lock:
            futures = [s.future for s in self._running.values()]
        _, stuck = concurrent.futures.wait(futures, timeout=STOP_WAIT)
        if stuck:
            log.warning("daemon.syncs_still_running", accounts=len(stuck))
        self._pool.shutdown(wait=False, cancel_futures=True)
        for watcher in self._watchers.values():
            watcher.stop(timeout=1)
        self._runner.close_sessions()
        self.sender.join(timeout=3)
        if not self.sender.is_alive():  # else it may still poll the pipe: the process is ending anyway
            os.close(self._outbox_stop_r)
            os.close(self._outbox_stop_w)
        self._keeper_stop.set()
        self._keeper.join(timeout=2)
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
        if self._round_started:  # a new sync.interval counts from the last round's start, not from the next
            self._round_at = min(self._round_at, self._round_started + new.sync.interval.total_seconds())
        self._runner.reconfigure(new)
        self._outbox.reconfigure(new)
        log.info("daemon.reloaded", accounts_paused=sum(p.paused for p in new.accounts.values()))
        self._notifier.ready("config reloaded")

    def _next_wakeups(self, timeout: float) -> set[int]:
        """Accounts whose IDLE watcher reported a change, waiting at most `timeout` for the first (or for a sync to
        end: that puts None)."""
        try:
            first = self._wakeups.get(timeout=timeout)
        except queue.Empty:
            return set()
        ids = set() if first is None else {first}
        while True:
            try:
                more = self._wakeups.get_nowait()
            except queue.Empty:
                return ids
            if more is not None:
                ids.add(more)

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
        # only what the HR app writes (not `state`, which inboxd itself changes as it syncs)
        return contacts, tuple((a.id, a.enabled) for a in accounts)

    # -- leases ------------------------------------------------------------------------------------------------

    def _apply_leases(self, accounts: list[Account]) -> None:
        """Take this node's fair share of the leases; an account this node now holds syncs at once. While the
        database does not answer, the node keeps what it holds: the keeper stops the syncs if the leases cannot be
        renewed for 2/3 of a period (one may then be another node's)."""
        ids = [a.id for a in accounts if self._only is None or a.email == self._only]
        with self._lock:
            busy = set(self._running)
        try:
            owned = self._leases.rebalance(ids, busy=busy)
        except sa.exc.SQLAlchemyError:
            log.warning("daemon.leases_unavailable")
            return
        self._leases_known = True
        with self._lock:
            if owned != self._owned:
                log.info("daemon.leases_changed", held=len(owned))
            merge(self._due, owned - self._owned, Why.CHANGED)
            self._owned = owned
        self._runner.retain_sessions(owned)  # log out of the accounts another node took

    def _keep_leases(self) -> None:
        """Renew held leases every third of a lease period, whatever the main loop is doing. An account whose lease
        was found lost (or could not be renewed for 2/3 of a period) is no longer this node's at once: its running
        sync stops between batches and no new one starts, so an account is never written by two nodes for longer
        than one batch."""
        keep_renewing(self._leases, self._keeper_stop, self._owned_now, self._drop_accounts)

    def _owned_now(self) -> set[int]:
        with self._lock:
            return set(self._owned)

    def _drop_accounts(self, account_ids: set[int]) -> None:
        with self._lock:
            lost = set(account_ids)
            self._owned = self._owned - lost
            for account_id in lost:
                self._due.pop(account_id, None)
                if self._round is not None:
                    self._round.pending.discard(account_id)
                if account_id in self._running:
                    self._running[account_id].stop.set()

    # -- push ------------------------------------------------------------------------------------------------

    def _refresh_watchers(self, accounts: list[Account]) -> None:
        """One IDLE watcher per account that syncs and has had its first sync attempt in this process (its catch-up
        on connecting would only repeat that sync); stopped for accounts paused, disabled, failed or gone."""
        if self._stop.is_set():  # _shut_down stops them all at once (asking each first, then waiting)
            return
        by_id = {a.id: a for a in accounts}
        now = self._clock.now()
        with self._lock:
            owned = set(self._owned)
        wanted = {
            a.id
            for a in accounts
            if a.id in owned and a.id in self._seen and self._seen[a.id].attempted and decide(a, self._config, now).run
        }
        for account_id in set(self._watchers) - wanted:
            self._watchers.pop(account_id).stop(timeout=2)
            gone = by_id.get(account_id)
            log.info("idle.stopped", account=gone.email if gone else account_id, state=gone.state if gone else "gone")
        for account_id in wanted - set(self._watchers):
            self._watchers[account_id] = self._watch(by_id[account_id])

    def _watch(self, account: Account) -> IdleWatcher:
        provider = self._config.providers[account.provider]
        watcher = IdleWatcher(
            account.email,
            lambda: self._runner.connections.imap(account, provider),
            lambda: self._wakeups.put(account.id),
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
