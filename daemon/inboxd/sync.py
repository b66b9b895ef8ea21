"""How one mailbox is synced: folder by folder, header first, bodies only for messages not yet stored.

With scope "all" and no exclusions nothing in the header fields decides before the body, so a first sync has no
header phase: each run's bodies come with their flags in one FETCH (runs are cut by size from a SEARCH LARGER per
batch), and the header fields are taken from the parsed body.

The decisions come from planner.py; this module carries them out against an ImapSession and the Store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import structlog

from inboxd.clock import Clock
from inboxd.dialect import Dialect, GenericImap
from inboxd.errors import Interrupted, RetryLater, UnparseableMessage
from inboxd.gmail import Gmail
from inboxd.imap import FlagUpdate, HeaderInfo, ImapSession, SelectInfo, is_refusal
from inboxd.parsing import InlineParser, MessageParser, ParseJob
from inboxd.planner import (
    ExpungeCheck,
    FolderSpec,
    FolderStatus,
    PlanKind,
    batches,
    direction,
    expunged_uids,
    imported_earlier,
    message_identity,
    plan_folder,
)
from inboxd.prefetch import Prefetched
from inboxd.scope import NO_EXCLUSIONS, Exclusions, in_scope
from inboxd.store import Account, NewLocation, NewMessage, Store, StoredFolder

log = structlog.get_logger(__name__)


class StopFlag(Protocol):
    """Anything with is_set(): a threading.Event, or several combined (shutdown, lost lease)."""

    def is_set(self) -> bool: ...


# progress(done, total): messages processed so far in this account's sync, and the total known so far; an import
# resumed (the account's first sync, interrupted) counts what its earlier attempts processed in both.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class SyncSettings:
    batch_size: int = 200
    max_attachment_bytes: int = 25 * 1024 * 1024
    # A batch counts messages, not bytes: its bodies are fetched, parsed and stored in runs of at most this many
    # bytes (RFC822.SIZE; a bigger message is a run of its own), so a batch of big messages is never in memory at once.
    max_fetch_bytes: int = 32 * 1024 * 1024
    # Without CONDSTORE flag changes are invisible to STATUS: re-read all flags at most this often.
    flag_scan_interval: timedelta = timedelta(minutes=15)
    # None: store everything (scope "all"); else the normalized addresses of the HR app's contacts.
    contacts: frozenset[str] | None = None
    # contacts (as the HR app wrote them) whose older mail this account has not been searched for yet
    backfill: frozenset[str] = frozenset()
    exclusions: Exclusions = NO_EXCLUSIONS
    # scope "all": a first sync skips the header phase (AccountSync._header_fields_decide_nothing): one round trip
    # and one header parse less per batch (2k-message first sync 10.4 s -> 7.6 s), and no per-message FETCH of
    # flags and sizes either (_fetch_runs_bodies_first)
    bodies_first: bool = True


@dataclass(slots=True)
class SyncStats:
    folders: int = 0
    folders_unchanged: int = 0
    new_messages: int = 0
    remapped: int = 0
    flag_changes: int = 0
    expunged: int = 0
    quarantined: int = 0
    out_of_scope: int = 0
    backfilled: int = 0
    # contacts (as in SyncSettings.backfill) whose older mail is not all stored yet: a message found had no body;
    # the caller must not record them as searched (the next sync searches again)
    backfill_incomplete: frozenset[str] = frozenset()
    bytes_downloaded: int = 0
    # the progress: messages to process and processed; an import resumed counts its folders' messages at or below
    # their cursors, processed by its earlier attempts, in both (AccountSync._count)
    total: int = 0
    done: int = 0


@dataclass(frozen=True, slots=True)
class _FetchedRun:
    """One run of a batch with its bodies fetched: what _store_run needs, made by _fetch_runs."""

    batch: list[int]  # the batch's UIDs (the run is part of it)
    uids: list[int]  # the UIDs whose bodies were asked for
    bodies: dict[int, bytes]
    parsed: ParseJob  # the bodies, parsed (in a worker process with a ParserPool)
    headers: dict[int, HeaderInfo]
    identities: dict[int, str | None]
    known: dict[int, tuple[int, NewLocation]]  # stored messages met again (the batch's first run carries them)
    cursor: int  # where the folder's cursor may move once this run is stored
    last_of_batch: bool
    out_of_scope: int


BODY_MISSES_TO_QUARANTINE = 3  # syncs in a row without a message's body before it is quarantined (_given_up)
# a message quarantined without bytes (its body never came) is asked for again this often, for this long after it
# was quarantined (_retry_bodiless): what the server could not serve for a minute must not be lost for good
BODILESS_RETRY_EVERY = timedelta(hours=1)
BODILESS_RETRY_FOR = timedelta(days=7)


class AccountSync:
    """One sync cycle of one account over one authenticated IMAP session."""

    def __init__(
        self,
        store: Store,
        account: Account,
        session: ImapSession,
        *,
        settings: SyncSettings,
        clock: Clock,
        progress: Progress | None = None,
        stop: StopFlag | None = None,
        parser: MessageParser | None = None,
        body_misses: MutableMapping[tuple[int, str, int, int], int] | None = None,
        bodiless_retried: MutableMapping[tuple[int, str, int], float] | None = None,
    ) -> None:
        self._store = store
        self._account = account
        self._session = session
        self._settings = settings
        self._clock = clock
        self._progress = progress
        self._stop = stop  # set on SIGTERM: stop between batches (each batch is committed with its cursor)
        self._parser: MessageParser = parser or InlineParser()
        self.stats = SyncStats()
        self._log = log.bind(account=account.email)
        self._dialect: Dialect = Gmail() if session.capabilities.gmail else GenericImap()
        self._bodies_first = False  # this sync's new messages skip the header-field FETCH (see _ingest)
        # the account's import (its first sync, maybe resumed after an interruption: runner._ImportProgress): its
        # progress is of the whole mailbox, with what earlier attempts processed
        self._importing = account.last_sync_at is None
        # a first sync's STATUS of the folders not reached yet: their MESSAGES are counted in stats.total so that the
        # import's progress shows the whole mailbox from the start (replaced by the exact count per folder), and
        # each is the STATUS its folder's sync plans from (a first sync is FULL whatever it says)
        self._estimates: dict[str, FolderStatus] = {}
        # an import resumed: how many messages of the folders not reached yet its earlier attempts processed, counted
        # in stats.done (and stats.total) from the first report on, replaced by the exact count per folder
        self._earlier: dict[str, int] = {}
        # syncs in a row in which a message's body did not come, by (account, folder, UIDVALIDITY, UID): kept by the
        # caller across syncs (Runner), so that one the server never returns is quarantined (see _given_up)
        self._body_misses = body_misses if body_misses is not None else {}
        # when the bodiless quarantined messages of (account, folder, UIDVALIDITY) were last asked for again
        # (monotonic), kept by the caller across syncs like body_misses
        self._bodiless_retried = bodiless_retried if bodiless_retried is not None else {}
        self._retrying = False  # in _retry_bodiless: a body that does not come again is not counted again
        self._incomplete = False  # a body of the folder being synced did not come (its cursor is held)

    def run(self) -> SyncStats:
        specs = self._dialect.folders(self._session.list_folders())
        folders = self._store.prepare_folders(self._account.id, specs)
        first_sync = all(f.cursor.uidvalidity is None for f in folders.values())
        # an import resumed (interrupted by a restart or a lost connection) goes on as it began: what is above its
        # cursors is as new as in a first sync
        self._bodies_first = self._header_fields_decide_nothing(first_sync=first_sync or self._importing)
        if (first_sync or self._importing) and self._progress is not None and len(specs) > 1:
            self._estimate(specs, folders)
        refused: list[RetryLater] = []
        for spec in specs:
            self._check_stop()
            try:
                self._sync_folder(folders[spec.name])
            except RetryLater as exc:
                self._count(-self._unestimate(spec.name), -self._unearlier(spec.name))
                if not is_refusal(exc):
                    raise  # the connection is gone: the account's sync is retried
                # one folder the server will not open (NO: no read right, [UNAVAILABLE], deleted meanwhile) must
                # not keep the folders after it from syncing, cycle after cycle; what was stored stays stored
                self._log.warning("sync.folder_refused", folder=spec.name, error=str(exc)[:200])
                refused.append(exc)
        if refused and len(refused) == len(specs):
            raise refused[0]  # nothing synced: the account reports the error
        if self._settings.backfill and not first_sync:  # a first sync has just seen every message anyway
            for spec in specs:
                self._backfill(spec, self._settings.backfill)
        # every location change above also marked its message dirty in the same transaction; an interrupted
        # earlier sync left its marks too, so nothing is lost to an exception between change and recompute
        self._store.refresh_dirty(self._account.id)
        self._log.info(
            "sync.account_done",
            folders=self.stats.folders,
            unchanged=self.stats.folders_unchanged,
            new=self.stats.new_messages,
            remapped=self.stats.remapped,
            flags=self.stats.flag_changes,
            expunged=self.stats.expunged,
            quarantined=self.stats.quarantined,
            bytes=self.stats.bytes_downloaded,
        )
        return self.stats

    # -- one folder --------------------------------------------------------------------------------------------

    def _sync_folder(self, folder: StoredFolder) -> None:
        """One folder, from its stored state as prepare_folders read it at the start of this sync (only this
        folder's own sync changes it)."""
        spec = spec_of(folder)
        self.stats.folders += 1
        status = self._estimates.get(spec.name) or self._session.status(spec.name)
        plan = plan_folder(folder.cursor, status, self._session.capabilities, flag_scan_due=self._flag_scan_due(folder))
        if plan.kind is PlanKind.UNCHANGED:
            self.stats.folders_unchanged += 1
            if self._importing:  # an import resumed: an earlier attempt finished this folder, all of it is done
                self._count(status.messages - self._unestimate(spec.name), status.messages - self._unearlier(spec.name))
            self._retry_bodiless(folder, status.uidvalidity, None)
            return
        selected = self._session.select(spec.name)
        # Re-plan from SELECT's numbers: the folder may have changed between STATUS and SELECT.
        plan = plan_folder(
            folder.cursor,
            FolderStatus(selected.uidvalidity, selected.uidnext, selected.exists, selected.highest_modseq),
            self._session.capabilities,
            flag_scan_due=self._flag_scan_due(folder),
        )
        flog = self._log.bind(folder=spec.name, plan=plan.kind.value, reason=plan.reason)
        flog.info("sync.folder_start")
        self._incomplete = False
        last_uid = folder.cursor.last_uid
        if plan.kind is PlanKind.FULL:
            self._store.start_full_sync(folder.id, selected.uidvalidity, reset_locations=plan.reset_locations)
            last_uid = 0
        new_uids = self._session.uids_after(last_uid)
        # an import resumed: the folder's messages at or below its cursor were processed by an earlier attempt
        earlier = 0
        if self._importing and plan.kind is not PlanKind.FULL:
            earlier = max(0, selected.exists - len(new_uids))
        self._count(len(new_uids) + earlier - self._unestimate(spec.name), earlier - self._unearlier(spec.name))
        self._ingest(folder, selected, batches(new_uids, self._settings.batch_size))
        if plan.kind is PlanKind.INCREMENTAL:
            self._apply_changes(
                folder,
                selected,
                plan.flags_changed_since,
                plan.refresh_all_flags,
                plan.expunge_check,
                # every stored UID, also those above a cursor held back by a message that did not come: all are
                # below UIDNEXT; a server whose SELECT gave none (0) is asked up to the highest stored
                up_to_uid=max(
                    folder.cursor.last_uid,
                    selected.uidnext - 1 if selected.uidnext else self._store.highest_uid(folder.id),
                ),
            )
        # a folder left incomplete (a body did not come) must not look "unchanged" to the next STATUS check
        self._store.finish_folder(
            folder.id,
            uidnext=None if self._incomplete else selected.uidnext,
            highest_modseq=selected.highest_modseq,
            message_count=selected.exists,
        )
        flog.info("sync.folder_done", new=len(new_uids))
        self._retry_bodiless(folder, selected.uidvalidity, selected)

    def _retry_bodiless(self, folder: StoredFolder, uidvalidity: int | None, selected: SelectInfo | None) -> None:
        """Ask again, every BODILESS_RETRY_EVERY for BODILESS_RETRY_FOR, for the folder's messages quarantined
        without bytes (_given_up: the server sent no body in BODY_MISSES_TO_QUARANTINE syncs in a row, which pushes
        can make a minute): one that comes now is stored as a new message would be, and its quarantine row goes.
        Not during an import, whose progress counts every message once; the folder is selected only when it has
        such messages."""
        if uidvalidity is None or self._importing:
            return
        key = (self._account.id, folder.name, uidvalidity)
        now = self._clock.monotonic()
        last = self._bodiless_retried.get(key)
        if last is not None and now - last < BODILESS_RETRY_EVERY.total_seconds():
            return
        self._bodiless_retried[key] = now
        since = self._clock.now() - BODILESS_RETRY_FOR
        uids = self._store.bodiless_quarantined(self._account.id, folder.name, uidvalidity, since=since)
        if not uids:
            return
        if selected is None:
            selected = self._session.select(folder.name)
            if selected.uidvalidity != uidvalidity:
                return  # the next sync re-maps the folder; the old UIDs mean nothing now
        incomplete, bodies_first, self._bodies_first, self._retrying = self._incomplete, self._bodies_first, False, True
        done = self.stats.done  # no progress of this sync's: the messages were counted when first met
        try:
            self._ingest(folder, selected, batches(uids, self._settings.batch_size))
        finally:
            self._incomplete, self._bodies_first, self._retrying = incomplete, bodies_first, False
            self.stats.done = done
        released = self._store.release_quarantined(self._account.id, folder.id, uidvalidity, uids)
        self._log.info("sync.quarantine_retried", folder=folder.name, asked=len(uids), stored=released)

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop.is_set():
            raise Interrupted("stopping: the rest of this sync waits for the next start")

    def _backfill(self, spec: FolderSpec, addresses: frozenset[str]) -> None:
        """Fetch the older messages of newly added contacts: a server-side search, then the usual header-first
        ingest of the UIDs not stored yet (newer ones are the regular sync's)."""
        folder = self._store.ensure_folder(self._account.id, spec.name, spec.special_use)
        selected = self._session.select(spec.name)
        if selected.uidvalidity != folder.cursor.uidvalidity:
            return  # the next regular sync re-maps this folder first
        self._bodies_first = False
        found = self._session.search_addresses(sorted(addresses))
        wanted = sorted(uid for uid in found - self._store.known_uids(folder.id) if uid <= folder.cursor.last_uid)
        self._count(len(wanted))
        self._incomplete = False
        self._ingest(folder, selected, batches(wanted, self._settings.batch_size))
        if self._incomplete:
            # a body did not come: no cursor holds it here (the UIDs are below the folder's cursor), so only
            # searching again finds it; which contact it was for is unknown without it, so all of them stay open
            self.stats.backfill_incomplete |= addresses
        if wanted:
            self._log.info("sync.backfill", folder=spec.name, contacts=len(addresses), found=len(wanted))
            self.stats.backfilled += len(wanted)

    def _header_fields_decide_nothing(self, *, first_sync: bool) -> bool:
        """Whether new messages may skip the header-field FETCH (Message-ID, addresses, references) and take those
        fields from the parsed body: per batch one SEARCH for its big messages (their sizes cut the body runs by
        max_fetch_bytes), then one FETCH of bodies with their flags per run, instead of header fields, then bodies
        (_fetch_runs_bodies_first).

        Only when the header fields decide nothing:
        - scope "all": no contact admission, every message is stored;
        - no exclusions: with exclusions configured the header-first path stays, so that excluded mail (every
          participant excluded, or an excluded label) is never downloaded at all; applying them to the parsed
          message would store the same rows but download (and hold) what the admin excluded;
        - the account's first sync, or its import resumed after an interruption (no sync of it finished yet):
          otherwise a stored message met again (a UIDVALIDITY change, a renamed folder, a message moved in from
          another folder, a sent message adopted from the outbox) is recognized by its Message-ID before its body is
          downloaded. On a first sync only a copy in a second folder (or an outbox message sent meanwhile) costs its
          body; it is then stored as one more location of the same row (Store.store_batch by identity,
          _adopt_sent), as the header-first path would have stored it."""
        if not self._settings.bodies_first:
            return False
        if self._settings.contacts is not None or self._settings.exclusions != NO_EXCLUSIONS:
            return False
        return first_sync

    def _flag_scan_due(self, folder: StoredFolder) -> bool:
        synced_at = folder.synced_at
        return synced_at is None or self._clock.now() - synced_at >= self._settings.flag_scan_interval

    def _apply_changes(
        self,
        folder: StoredFolder,
        selected: SelectInfo,
        since: int | None,
        all_flags: bool,
        expunge: ExpungeCheck,
        *,
        up_to_uid: int,
    ) -> None:
        vanished: set[int] = set()
        updates: list[FlagUpdate] = []
        if since is not None:
            updates, vanished = self._session.changed_flags(up_to_uid, since, vanished=expunge is ExpungeCheck.VANISHED)
        elif all_flags:
            updates = self._session.all_flags(up_to_uid)
        if updates:
            changed = self._store.update_flags(
                folder.id,
                {  # an item the reply left out is unknown and stays as stored (Gmail's labels too: not "none")
                    u.uid: (u.flags, u.modseq, None if u.gm_labels is None else self._dialect.labels(u.gm_labels))
                    for u in updates
                },
            )
            self.stats.flag_changes += len(changed)
        gone: set[int] = set()
        if expunge is ExpungeCheck.VANISHED:
            gone = vanished
        elif expunge is ExpungeCheck.UID_DIFF:
            known = self._store.known_uids(folder.id)
            # ask about the UIDs we store, not the whole folder: counts cannot tell when some messages are
            # deliberately not stored (out of scope, excluded, quarantined)
            gone = expunged_uids(known, self._session.existing_uids(known))
        if gone:
            removed = self._store.remove_locations(folder.id, gone)
            self.stats.expunged += len(removed)

    # -- new messages -------------------------------------------------------------------------------------------

    def _ingest(self, folder: StoredFolder, selected: SelectInfo, uid_batches: Iterable[list[int]]) -> None:
        """Store the new messages of ``uid_batches``: _fetch_runs asks the server, _store_run parses and stores.

        When the header fields decide nothing (bodies first: a first sync of scope "all") the fetching runs one run
        ahead in a thread (inboxd.prefetch): the server sends run n+1 while run n is parsed and stored. Otherwise the
        header phase reads and writes the database (identities, adopted outbox rows, contacts), so the two take
        turns."""
        runs = self._fetch_runs(folder, uid_batches)
        if not self._bodies_first:
            self._store_runs(folder, selected, runs)
            return
        with Prefetched(runs, name=f"inboxd-fetch-{self._account.id}") as ahead:
            self._store_runs(folder, selected, iter(ahead))

    def _fetch_runs(self, folder: StoredFolder, uid_batches: Iterable[list[int]]) -> Iterator[_FetchedRun]:
        """The server's side of _ingest, batch by batch: header phase, admission, then bodies in runs by size."""
        if self._bodies_first:
            yield from self._fetch_runs_bodies_first(uid_batches)
            return
        for batch in uid_batches:
            self._check_stop()
            headers, identities, known, need_body, out_of_scope = self._header_phase(folder, batch)
            unanswered = self._unanswered(batch, headers)  # held like a missing body (see _fetch_runs_bodies_first)
            runs = _runs_by_size(need_body, headers, self._settings.max_fetch_bytes)
            for index, run in enumerate(runs):
                last = index + 1 == len(runs)
                bodies = self._session.fetch_bodies(run) if run else {}
                yield _FetchedRun(
                    batch=batch,
                    uids=sorted([*run, *unanswered]) if index == 0 else run,
                    bodies=bodies,
                    parsed=self._parser.start(bodies, max_attachment_bytes=self._settings.max_attachment_bytes),
                    headers=headers,
                    identities=identities,
                    known=known if index == 0 else {},
                    # below the next run's first UID every message is stored, re-mapped or out of scope
                    cursor=max(batch) if last else runs[index + 1][0] - 1,
                    last_of_batch=last,
                    out_of_scope=out_of_scope if index == 0 else 0,
                )

    def _fetch_runs_bodies_first(self, uid_batches: Iterable[list[int]]) -> Iterator[_FetchedRun]:
        """_fetch_runs without a header phase: each run's bodies come with their flags, dates and Gmail ids in one
        FETCH. Runs are cut by size as before, from one SEARCH per batch for its messages over a share of
        max_fetch_bytes (body_share; the rest are counted at that share) and the sizes of those few (bodies_runs)."""
        for batch in uid_batches:
            self._check_stop()
            share = body_share(self._settings.max_fetch_bytes, len(batch))
            big = self._session.larger_than(batch, share)
            meta = self._session.fetch_headers(sorted(big), fields=False) if big else {}
            sizes = {uid: h.size for uid, h in meta.items()}
            runs = bodies_runs(batch, big, sizes, share, self._settings.max_fetch_bytes)
            for index, run in enumerate(runs):
                last = index + 1 == len(runs)
                fetched = self._session.fetch_messages(run) if run else {}
                bodies = {uid: body for uid, (body, _) in fetched.items() if body is not None}
                headers = {uid: header for uid, (_, header) in fetched.items()}
                yield _FetchedRun(
                    batch=batch,
                    # a UID without any reply was expunged after it was listed, unless the server still has it
                    # (a reply lost or merged into another's): that one holds the cursor like a missing body
                    uids=sorted([*fetched, *self._unanswered(run, fetched)]),
                    bodies=bodies,
                    parsed=self._parser.start(bodies, max_attachment_bytes=self._settings.max_attachment_bytes),
                    headers=headers,
                    identities={uid: self._dialect.identity(h) for uid, h in headers.items()},
                    known={},
                    cursor=max(batch) if last else runs[index + 1][0] - 1,
                    last_of_batch=last,
                    out_of_scope=0,
                )

    def _unanswered(self, asked: list[int], answered: Mapping[int, object]) -> list[int]:
        """The UIDs of ``asked`` the server gave no FETCH reply for and still has: one more UID SEARCH, only when a
        reply is missing. Usually none (the message was expunged after the UIDs were listed); a reply lost, or
        merged into another's by a mid-FETCH EXPUNGE renumbering (imapclient keys replies by sequence number),
        must not let the cursor pass a message that is there."""
        absent = [uid for uid in asked if uid not in answered]
        return sorted(self._session.existing_uids(absent)) if absent else []

    def _store_runs(self, folder: StoredFolder, selected: SelectInfo, runs: Iterable[_FetchedRun]) -> None:
        missing: list[int] = []
        held: int | None = None  # the lowest UID of this ingest that should have been stored and was not
        remapped = 0
        batch_open = False
        for run in runs:
            if not batch_open:  # between batches: a stop leaves a fetched-ahead batch unstored, the cursor before it
                self._check_stop()
                batch_open = True
            # the cursor never passes a message that should have been stored but whose body did not come, in this
            # batch or any before it: a later batch's cursor would otherwise skip it for good
            cursor = min(run.cursor, held - 1) if held is not None else run.cursor
            self.stats.out_of_scope += run.out_of_scope
            remapped += len(run.known)
            lost = self._store_run(folder, selected, run, cursor=cursor)
            missing += lost
            if lost:
                held = min(lost) if held is None else min(held, *lost)
            if not run.last_of_batch:
                continue
            if missing:
                self._log.warning("sync.bodies_missing", folder=folder.name, uids=len(missing))
                self._incomplete = True
            self.stats.remapped += remapped
            self.stats.done += len(run.batch)
            if self._progress is not None:
                self._progress(self.stats.done, self.stats.total)
            missing, remapped, batch_open = [], 0, False

    def _header_phase(
        self, folder: StoredFolder, batch: list[int]
    ) -> tuple[dict[int, HeaderInfo], dict[int, str | None], dict[int, tuple[int, NewLocation]], list[int], int]:
        """(headers, identities, known locations, UIDs whose bodies are needed, how many are out of scope)."""
        headers = self._session.fetch_headers(batch, fields=not self._bodies_first)
        identities = {uid: self._dialect.identity(h) for uid, h in headers.items()}
        known_ids = self._store.message_ids_by_identity(
            self._account.id, [i for i in identities.values() if i is not None]
        )
        # messages sent from the outbox were stored under "mid:<Message-ID>"; a server with its own identities
        # (Gmail) meets them here for the first time: adopt the row instead of storing the message twice
        provisional: dict[str, str] = {}
        thread_keys: dict[str, str] = {}
        for uid, h in headers.items():
            identity = identities[uid]
            if h.message_id and identity and identity not in known_ids and identity != f"mid:{h.message_id}":
                provisional[f"mid:{h.message_id}"] = identity
                if (key := self._dialect.thread_key(h)) is not None:
                    thread_keys[identity] = key
        if provisional:
            known_ids.update(self._store.adopt_identities(self._account.id, provisional, thread_keys))
        known: dict[int, tuple[int, NewLocation]] = {}
        unknown: list[HeaderInfo] = []
        for uid, header in headers.items():
            identity = identities[uid]
            if identity is not None and identity in known_ids:
                known[uid] = (known_ids[identity], self._location(header))
            else:
                unknown.append(header)
        # header first: out of scope or excluded messages are decided here and their bodies never downloaded (without
        # header fields, scope "all" and no exclusions, every message is admitted)
        need_body = self._admitted(unknown, folder)
        return headers, identities, known, need_body, len(unknown) - len(need_body)

    def _store_run(self, folder: StoredFolder, selected: SelectInfo, run: _FetchedRun, *, cursor: int) -> list[int]:
        """Parse and store the bodies of one run and its ``known`` locations in one transaction, moving the folder's
        cursor to ``cursor`` (or below the first UID whose body did not come); returns those UIDs."""
        known = dict(run.known)
        bodies, headers, identities = run.bodies, run.headers, run.identities
        new_messages: list[NewMessage] = []
        outcomes = run.parsed.result()
        for uid in sorted(bodies):
            raw = bodies[uid]
            self.stats.bytes_downloaded += len(raw)
            header = headers[uid]
            if self._dialect.is_draft(header):  # bodies first: no header phase decided before (_admitted)
                self.stats.out_of_scope += 1
                continue
            parsed = outcomes[uid]
            if isinstance(parsed, UnparseableMessage):
                self._quarantine(folder, selected, uid, reason=parsed.message, raw=raw)
                continue
            identity = identities[uid] or message_identity(parsed.message_id_header or header.message_id, raw)
            assert identity is not None  # raw is given, so there is always an identity
            location = self._location(header)
            outbound = self._dialect.is_outbound(location.labels, spec_of(folder))
            new_messages.append(
                NewMessage(
                    identity=identity,
                    parsed=parsed,
                    folder_name=folder.name,
                    direction="outbound" if outbound else direction(parsed.from_email, self._account.email, None),
                    received_at=header.internaldate,
                    location=location,
                    thread_key=self._dialect.thread_key(header),
                )
            )
        if self._bodies_first:
            new_messages = self._recognize_stored(new_messages, known)
        missing = self._given_up(folder, selected, [uid for uid in run.uids if uid not in bodies], bodies)
        last_uid = min(cursor, min(missing) - 1) if missing else cursor
        if self._retrying:  # messages behind the cursor: it stays where it is (it may be held below them)
            last_uid = 0
        inserted = self._store.store_batch(self._account.id, folder.id, new_messages, known, last_uid=last_uid)
        self.stats.new_messages += len(inserted)
        return missing

    def _given_up(
        self, folder: StoredFolder, selected: SelectInfo, missing: list[int], bodies: Mapping[int, bytes]
    ) -> list[int]:
        """``missing`` without the messages whose body did not come in BODY_MISSES_TO_QUARANTINE syncs in a row:
        those are quarantined (with no bytes) and the cursor may pass them. A message the server never returns
        would otherwise hold the cursor for good, and every sync would read again every UID after it."""
        account, folder_name, uidvalidity = self._account.id, folder.name, selected.uidvalidity
        for uid in bodies:
            self._body_misses.pop((account, folder_name, uidvalidity, uid), None)
        if self._retrying:  # already quarantined: asked for again later (_retry_bodiless)
            return missing
        still: list[int] = []
        for uid in missing:
            key = (account, folder_name, uidvalidity, uid)
            self._body_misses[key] = misses = self._body_misses.get(key, 0) + 1
            if misses < BODY_MISSES_TO_QUARANTINE:
                still.append(uid)
                continue
            del self._body_misses[key]
            reason = f"the server sent no body for this message in {misses} syncs in a row"
            self._quarantine(folder, selected, uid, reason=reason, raw=None)
            # asked for again in BODILESS_RETRY_EVERY, not at the end of this very sync
            self._bodiless_retried.setdefault((account, folder_name, uidvalidity), self._clock.monotonic())
        return still

    def _quarantine(
        self, folder: StoredFolder, selected: SelectInfo, uid: int, *, reason: str, raw: bytes | None
    ) -> None:
        """Keep a message out of mail_messages, with the reason (and its bytes when there are any): the sync goes on."""
        self._store.quarantine(self._account.id, folder.name, selected.uidvalidity, uid, reason=reason, raw=raw)
        self.stats.quarantined += 1
        self._log.warning("sync.message_quarantined", folder=folder.name, uid=uid, reason=reason)

    def _recognize_stored(
        self, new_messages: list[NewMessage], known: dict[int, tuple[int, NewLocation]]
    ) -> list[NewMessage]:
        """What _ingest does from the header fields, done from the parsed bodies when those were not fetched: a
        message already stored (a copy in another folder) or sent from the outbox (stored as "mid:<Message-ID>",
        met here under the server's own identity) becomes one more location of its row, added to ``known`` and
        counted as re-mapped, instead of a new message."""
        stored = self._store.message_ids_by_identity(self._account.id, [m.identity for m in new_messages])
        for msg in new_messages:
            if msg.identity in stored:
                known[msg.location.uid] = (stored[msg.identity], msg.location)
                self.stats.remapped += 1
        new_messages = [m for m in new_messages if m.identity not in stored]
        provisional: dict[str, str] = {}
        thread_keys: dict[str, str] = {}
        for msg in new_messages:
            mid = msg.parsed.message_id_header
            if mid and msg.identity != f"mid:{mid}":
                provisional[f"mid:{mid}"] = msg.identity
                if msg.thread_key is not None:
                    thread_keys[msg.identity] = msg.thread_key
        if not provisional:
            return new_messages
        adopted = self._store.adopt_identities(self._account.id, provisional, thread_keys)
        kept: list[NewMessage] = []
        for msg in new_messages:
            if msg.identity in adopted:
                known[msg.location.uid] = (adopted[msg.identity], msg.location)
                self.stats.remapped += 1
            else:
                kept.append(msg)
        return kept

    def _admitted(self, headers: list[HeaderInfo], folder: StoredFolder) -> list[int]:
        """UIDs that may be stored: not a draft (Gmail's All Mail holds them: not sent mail), not in an excluded
        label/folder, and in scope by their participants or by their conversation (once a thread touches a
        candidate, the rest of the thread is kept too)."""
        exclusions = self._settings.exclusions
        admitted: list[int] = []
        undecided: list[HeaderInfo] = []
        for header in headers:
            if self._dialect.is_draft(header):
                continue
            location = self._location(header)
            if exclusions.excludes_labels(location.labels if location.labels is not None else [folder.name]):
                continue
            if in_scope(header.addresses, self._settings.contacts, exclusions):
                admitted.append(header.uid)
            else:
                undecided.append(header)
        if undecided and self._settings.contacts is not None:
            keys = {h.uid: self._dialect.thread_key(h) for h in undecided}
            stored_threads = self._store.existing_thread_keys(self._account.id, [k for k in keys.values() if k])
            stored_ids = self._store.existing_message_ids(
                self._account.id, [r for h in undecided for r in h.references]
            )
            admitted += [
                h.uid for h in undecided if keys[h.uid] in stored_threads or not stored_ids.isdisjoint(h.references)
            ]
        return sorted(admitted)

    def _location(self, header: HeaderInfo) -> NewLocation:
        return NewLocation(header.uid, header.flags, header.modseq, self._dialect.labels(header.gm_labels))

    def _estimate(self, specs: list[FolderSpec], folders: Mapping[str, StoredFolder]) -> None:
        """A first sync or an import of several folders: their message counts (STATUS), so that the first progress
        report already has the whole mailbox, and, for an import resumed, how many of them its earlier attempts
        processed; a folder whose STATUS fails is counted when it is reached."""
        for spec in specs:
            try:
                status = self._estimates[spec.name] = self._session.status(spec.name)
                if self._importing:
                    self._earlier[spec.name] = self._processed_earlier(folders[spec.name], status)
            except RetryLater as exc:
                if not is_refusal(exc):
                    raise
        self._count(sum(s.messages for s in self._estimates.values()), sum(self._earlier.values()))

    def _processed_earlier(self, folder: StoredFolder, status: FolderStatus) -> int:
        """How many of the folder's messages earlier attempts of this import processed: from its cursor and STATUS
        (planner.imported_earlier), else from the server, as its sync will count them: the messages at or below
        the cursor (a SELECT and a SEARCH more, for the folder an interrupted attempt was in, or one with new mail)."""
        known = imported_earlier(folder.cursor, status)
        if known is not None:
            return known
        selected = self._session.select(folder.name)
        if selected.uidvalidity != folder.cursor.uidvalidity:
            return 0  # changed since the STATUS: synced again from UID 1
        return max(0, selected.exists - len(self._session.uids_after(folder.cursor.last_uid)))

    def _unestimate(self, name: str) -> int:
        """The folder's count from the first sync's STATUS, taken out of the estimate (its exact one replaces it)."""
        status = self._estimates.pop(name, None)
        return status.messages if status is not None else 0

    def _unearlier(self, name: str) -> int:
        """The folder's estimate of what earlier attempts processed, taken out (its exact count replaces it)."""
        return self._earlier.pop(name, 0)

    def _count(self, total: int, done: int = 0) -> None:
        """Add to the progress's total and done (messages, or corrections of an estimate) and report it."""
        self.stats.total += total
        self.stats.done += done
        if self._progress is not None and (total or done):
            self._progress(self.stats.done, self.stats.total)


def spec_of(folder: StoredFolder) -> FolderSpec:
    return FolderSpec(folder.name, folder.special_use)


def body_share(max_bytes: int, batch_size: int) -> int:
    """The size up to which a bodies-first batch counts a message at this bound instead of asking its size: half of
    ``max_bytes`` spread over the batch, so that the small messages together take at most half a run and the big
    ones (counted at their sizes) fit in the other half. With the whole of ``max_bytes`` spread over the batch, any
    one big message made the bound overflow, and nearly every batch of a real mailbox became a full run plus a tail
    of a few messages: two FETCH commands, two transactions and a tail parsed in the sync thread, for nothing
    (the bench's 20k mailbox: 200 runs for 100 batches, now 100)."""
    return max(1, max_bytes // (2 * batch_size))


def bodies_runs(
    batch: list[int], big: set[int], sizes: dict[int, int | None], share: int, max_bytes: int
) -> list[list[int]]:
    """A bodies-first batch cut into runs of at most ``max_bytes``: the UIDs in ``big`` (over ``share`` bytes) by
    their ``sizes`` (one missing, expunged meanwhile, counts as max_bytes: a run of its own), every other UID as
    ``share`` bytes, its upper bound. A batch with nothing big is one run."""
    return _cut(batch, lambda uid: (sizes.get(uid) or max_bytes) if uid in big else share, max_bytes)


def _runs_by_size(uids: list[int], headers: dict[int, HeaderInfo], max_bytes: int) -> list[list[int]]:
    """``uids`` (sorted) cut into consecutive runs of at most ``max_bytes`` by RFC822.SIZE; at least one run, empty
    when there is nothing to fetch (the re-mapped locations and the cursor are still stored)."""
    return _cut(uids, lambda uid: headers[uid].size or 0, max_bytes)


def _cut(uids: list[int], size_of: Callable[[int], int], max_bytes: int) -> list[list[int]]:
    """``uids`` in order, cut into consecutive runs whose sizes add up to at most ``max_bytes`` (a UID bigger than
    that is a run of its own); at least one run, empty when ``uids`` is."""
    runs: list[list[int]] = [[]]
    total = 0
    for uid in uids:
        size = size_of(uid)
        if runs[-1] and total + size > max_bytes:
            runs.append([])
            total = 0
        runs[-1].append(uid)
        total += size
    return runs
