"""The store: every read and write inboxd makes to the shared database, for SQLite and PostgreSQL alike.

Accounts and credentials, folder cursors, message locations, messages with participants, attachments and threads.
The sync engine talks to this class only; SQL stays here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from inboxd.blob_gc import GcReport, collect_garbage, restore_abandoned
from inboxd.blobs import BlobStore
from inboxd.bulk import among, chunks, insert_returning_ids, insert_rows
from inboxd.clock import Clock
from inboxd.crypto import SecretBox
from inboxd.db_clock import database_now
from inboxd.errors import ReauthRequired, UsageError
from inboxd.models import (
    AccountLease,
    ContactBackfill,
    DirtyMessage,
    MailAccount,
    MailAttachment,
    MailContact,
    MailCredential,
    MailFolder,
    MailLocation,
    MailMessage,
    MailOutbox,
    MailParticipant,
    MailQuarantine,
    MailThread,
)
from inboxd.parse import ParsedMessage
from inboxd.planner import FolderCursor, FolderSpec
from inboxd.scope import normalize_address
from inboxd.table_stats import TableStats
from inboxd.threads import ThreadInput, load_threads, move_to_key, write_threads

accounts_t = MailAccount.__table__  # type: ignore[attr-defined]
creds_t = MailCredential.__table__  # type: ignore[attr-defined]
folders_t = MailFolder.__table__  # type: ignore[attr-defined]
locations_t = MailLocation.__table__  # type: ignore[attr-defined]
messages_t = MailMessage.__table__  # type: ignore[attr-defined]
participants_t = MailParticipant.__table__  # type: ignore[attr-defined]
attachments_t = MailAttachment.__table__  # type: ignore[attr-defined]
quarantine_t = MailQuarantine.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]
contacts_t = MailContact.__table__  # type: ignore[attr-defined]
backfills_t = ContactBackfill.__table__  # type: ignore[attr-defined]
dirty_t = DirtyMessage.__table__  # type: ignore[attr-defined]
leases_t = AccountLease.__table__  # type: ignore[attr-defined]
outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]


def _mark_dirty(conn: sa.Connection, message_ids: Iterable[int], *, held_by: int | None = None) -> None:
    """Record, in the caller's transaction, that these messages need refresh_dirty (idempotent). ``held_by``: a
    folder whose re-map dropped their locations (start_full_sync); refresh_dirty leaves them until finish_folder
    of that folder releases them. A mark already held stays held when marked again without."""
    ids = sorted(set(message_ids))
    for chunk in chunks(ids):
        if held_by is None:
            marked = set(conn.execute(sa.select(dirty_t.c.message_id).where(dirty_t.c.message_id.in_(chunk))).scalars())
            fresh = [{"message_id": i, "held_by_folder_id": None} for i in chunk if i not in marked]
            if fresh:
                conn.execute(dirty_t.insert(), fresh)
            continue
        conn.execute(dirty_t.delete().where(dirty_t.c.message_id.in_(chunk)))
        conn.execute(dirty_t.insert(), [{"message_id": i, "held_by_folder_id": held_by} for i in chunk])


def _release_held(conn: sa.Connection, folder_ids: Sequence[int]) -> None:
    """The marks these folders held (their re-map finished, or the folders are gone) go to the next recompute."""
    conn.execute(dirty_t.update().where(dirty_t.c.held_by_folder_id.in_(folder_ids)).values(held_by_folder_id=None))


def _lookup(
    conn: sa.Connection, table: sa.Table, column: sa.Column[Any], where: Any, values: Iterable[str]
) -> dict[str, int]:
    """{value: row id} for the values of `column` present among `values` (bulk.among)."""
    found: dict[str, int] = {}
    for among_values in among(conn, column, sorted(set(values))):
        for row in conn.execute(sa.select(table.c.id, column).where(where, among_values)):
            found[row[1]] = row[0]
    return found


def _ids_by_identity(conn: sa.Connection, account_id: int, identities: Iterable[str]) -> dict[str, int]:
    """{provider identity: message id} of this account's stored messages among ``identities``."""
    where = messages_t.c.account_id == account_id
    return _lookup(conn, messages_t, messages_t.c.provider_message_id, where, identities)


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("INSERT returned no primary key")
    return int(key[0])


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    email: str
    provider: str
    enabled: bool
    state: str
    state_reason: str | None
    last_sync_at: datetime | None
    last_error: str | None
    hr_user_ref: str | None
    retry_at: datetime | None = None
    import_done: int | None = None  # the first sync's progress (mail_accounts.import_done / import_total)
    import_total: int | None = None


log = structlog.get_logger(__name__)

OAUTH2_REFRESH, PASSWORD, DELEGATED = "oauth2_refresh", "password", "delegated"
# a staged attachment file older than this belongs to a run that was never stored (a run takes seconds)
STAGED_MAX_AGE = timedelta(hours=1)
# state_reason of a disabled account whose mailbox was disconnected (credentials deleted)
DISCONNECTED_REASON = "disconnected: connect the mailbox again to resume syncing"


@dataclass(frozen=True, slots=True)
class Credential:
    kind: str  # OAUTH2_REFRESH | PASSWORD | DELEGATED (no secret: the provider's service account or app grant)
    secret: str = ""

    def __repr__(self) -> str:  # the secret never reaches a log or a traceback
        return f"Credential(kind={self.kind!r}, secret=<hidden>)"


@dataclass(slots=True)
class RefreshSlot:
    """One refresh's view of the stored refresh token; set ``rotated`` to store the provider's new one."""

    token: str
    rotated: str | None = None

    def __repr__(self) -> str:
        return "RefreshSlot(<hidden>)"


_REFRESH_LOCKS: dict[tuple[str, int], threading.Lock] = {}  # SQLite: per database file and account
_REFRESH_LOCKS_GUARD = threading.Lock()
# PostgreSQL advisory lock keys of Store._writing_messages: this base plus the account id (one 64-bit key space per
# database, shared with the HR app: the base keeps inboxd's keys out of the small numbers an application would pick)
_MESSAGES_LOCK = 0x1B0C_D000_0000_0000


@dataclass(frozen=True, slots=True)
class StoredFolder:
    id: int
    name: str
    special_use: str | None
    cursor: FolderCursor
    synced_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewLocation:
    uid: int
    flags: tuple[str, ...]
    modseq: int | None
    labels: list[str] | None = None  # Gmail: normalized X-GM-LABELS; None elsewhere (the folder is the label)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A parsed message ready to store, with where it was found."""

    identity: str
    parsed: ParsedMessage
    folder_name: str
    direction: str
    received_at: datetime | None
    location: NewLocation
    thread_key: str | None = None  # the server's conversation id (Gmail X-GM-THRID), else References threading


def _account(row: Any) -> Account:
    return Account(
        id=row.id,
        email=row.email,
        provider=row.provider,
        enabled=row.enabled,
        state=row.state,
        state_reason=row.state_reason,
        last_sync_at=row.last_sync_at,
        last_error=row.last_error,
        hr_user_ref=row.hr_user_ref,
        retry_at=row.retry_at,
        import_done=row.import_done,
        import_total=row.import_total,
    )


def _stored_folder(row: Any) -> StoredFolder:
    return StoredFolder(
        row.id,
        row.name,
        row.special_use,
        FolderCursor(
            uidvalidity=row.uidvalidity,
            last_uid=row.last_uid,
            uidnext=row.uidnext,
            highest_modseq=row.highest_modseq,
            message_count=row.message_count,
        ),
        row.synced_at,
    )


def _forget_folders(conn: sa.Connection, folder_ids: list[int]) -> None:
    """Drop these folders and their locations; the messages that were in them are marked dirty (their folders and
    labels are recomputed, an orphan is deleted by refresh_dirty)."""
    if not folder_ids:
        return
    touched = list(
        conn.execute(sa.select(locations_t.c.message_id).where(locations_t.c.folder_id.in_(folder_ids))).scalars()
    )
    conn.execute(locations_t.delete().where(locations_t.c.folder_id.in_(folder_ids)))
    conn.execute(folders_t.delete().where(folders_t.c.id.in_(folder_ids)))
    _release_held(conn, folder_ids)
    _mark_dirty(conn, touched)


class Store:
    def __init__(
        self, engine: sa.Engine, *, clock: Clock, secret_box: SecretBox | None = None, blobs: BlobStore | None = None
    ) -> None:
        self.engine = engine
        self._clock = clock
        self._box = secret_box
        self._blobs = blobs
        self._table_stats = TableStats(engine)

    @property
    def secret_box(self) -> SecretBox:
        if self._box is None:
            raise UsageError("no secrets key loaded")
        return self._box

    # -- accounts -------------------------------------------------------------------------------------------

    def add_account(
        self, email: str, provider: str, credential: Credential, *, hr_user_ref: str | None = None
    ) -> Account:
        """Create the account, or replace the credentials of an existing one (reconnect)."""
        if self._box is None:
            raise UsageError("no secrets key loaded: cannot store credentials")
        email = email.strip().lower()
        now = self._clock.now()
        sealed = self._box.encrypt(credential.secret)
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(accounts_t).where(accounts_t.c.email == email)).first()
            if row is None:
                account_id = _inserted_id(
                    conn.execute(
                        accounts_t.insert().values(
                            email=email,
                            provider=provider,
                            hr_user_ref=hr_user_ref,
                            enabled=True,
                            state="active",
                            created_at=now,
                            updated_at=now,
                        )
                    )
                )
            else:
                account_id = row.id
                conn.execute(
                    accounts_t.update()
                    .where(accounts_t.c.id == account_id)
                    .values(
                        provider=provider,
                        enabled=True,  # connecting again after a disconnect resumes the account
                        state="active",
                        state_reason=None,
                        last_error=None,
                        retry_at=None,
                        updated_at=now,
                        **({"hr_user_ref": hr_user_ref} if hr_user_ref is not None else {}),
                    )
                )
                conn.execute(creds_t.delete().where(creds_t.c.account_id == account_id))
            conn.execute(
                creds_t.insert().values(account_id=account_id, kind=credential.kind, secret=sealed, updated_at=now)
            )
            return _account(conn.execute(sa.select(accounts_t).where(accounts_t.c.id == account_id)).one())

    def accounts(self) -> list[Account]:
        with self.engine.connect() as conn:
            return [_account(r) for r in conn.execute(sa.select(accounts_t).order_by(accounts_t.c.email))]

    def account(self, email: str) -> Account | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(accounts_t).where(accounts_t.c.email == email.strip().lower())).first()
            return _account(row) if row else None

    def account_by_id(self, account_id: int) -> Account | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(accounts_t).where(accounts_t.c.id == account_id)).first()
            return _account(row) if row else None

    def credential(self, account_id: int) -> Credential:
        if self._box is None:
            raise UsageError("no secrets key loaded: cannot read credentials")
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(creds_t).where(creds_t.c.account_id == account_id)).first()
        if row is None:
            # disconnected (or never connected) and switched on again by hand: a person must connect it
            raise ReauthRequired("no stored credentials (the mailbox was disconnected): connect it again")
        return Credential(kind=row.kind, secret=self._box.decrypt(bytes(row.secret)))

    def credential_kind(self, account_id: int) -> str | None:
        """The kind of the stored credentials (kept in clear: known without the key), None when there are none."""
        with self.engine.connect() as conn:
            kind: str | None = conn.execute(
                sa.select(creds_t.c.kind).where(creds_t.c.account_id == account_id)
            ).scalar()
            return kind

    @contextlib.contextmanager
    def refresh_slot(self, account_id: int) -> Iterator[RefreshSlot]:
        """The stored refresh token, held for one refresh: on PostgreSQL the credentials row is locked (FOR UPDATE),
        so nodes and processes refresh one account one at a time and each sees the token the last one stored; a
        rotated token set on the slot is written in the same transaction. SQLite (one node) serializes in-process.
        """
        if self._box is None:
            raise UsageError("no secrets key loaded: cannot read credentials")
        postgres = self.engine.dialect.name == "postgresql"
        with contextlib.nullcontext() if postgres else self._refresh_lock(account_id), self.engine.begin() as conn:
            query = sa.select(creds_t).where(creds_t.c.account_id == account_id)
            if postgres:
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None:
                raise ReauthRequired("the mailbox was disconnected: its credentials are gone; connect it again")
            slot = RefreshSlot(self._box.decrypt(bytes(row.secret)))
            yield slot
            if slot.rotated is not None and slot.rotated != slot.token:
                conn.execute(
                    creds_t.update()
                    .where(creds_t.c.account_id == account_id)
                    .values(secret=self._box.encrypt(slot.rotated), updated_at=self._clock.now())
                )

    @contextlib.contextmanager
    def _writing_messages(self, account_id: int) -> Iterator[sa.Connection]:
        """A transaction that looks up an account's messages by identity and inserts the ones not found, serialized
        with every other such transaction of the account (the sync's batches, the outbox's sent copies), on every
        node and in every process: else both find no row, both insert, and the later one fails on the unique key
        (the account showed "internal error" until its next sync, or the sent copy went unlinked).

        PostgreSQL: a transaction-scoped advisory lock on the account, held to the commit (a batch with many
        attachments: seconds, its files' fsyncs included). SQLite: BEGIN IMMEDIATE, which takes the database's one
        write lock before the lookups instead of at the first insert: SQLite runs one writer at a time anyway, which
        now also waits out a batch's lookups and thread planning."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MESSAGES_LOCK + account_id})
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn

    def _refresh_lock(self, account_id: int) -> threading.Lock:
        with _REFRESH_LOCKS_GUARD:
            return _REFRESH_LOCKS.setdefault((str(self.engine.url), account_id), threading.Lock())

    def disconnect_account(self, account_id: int, reason: str) -> int:
        """Forget the credentials and stop the account (kept, with its mail, until purged); queued outbox rows fail
        with ``reason`` since nothing can send them now. Returns how many outbox rows failed."""
        now = self._clock.now()
        with self.engine.begin() as conn:
            conn.execute(creds_t.delete().where(creds_t.c.account_id == account_id))
            conn.execute(
                accounts_t.update()
                .where(accounts_t.c.id == account_id)
                .values(enabled=False, state="disabled", state_reason=reason, retry_at=None, updated_at=now)
            )
            failed: int = conn.execute(
                outbox_t.update()
                .where(outbox_t.c.account_id == account_id, outbox_t.c.status == "queued")
                .values(status="failed", last_error=reason, next_attempt_at=None)
            ).rowcount
            return failed

    def replace_refresh_token(self, account_id: int, refresh_token: str) -> None:
        """Persist a rotated refresh token (Microsoft rotates them on every use)."""
        if self._box is None:
            raise UsageError("no secrets key loaded: cannot store credentials")
        with self.engine.begin() as conn:
            conn.execute(
                creds_t.update()
                .where(creds_t.c.account_id == account_id)
                .values(secret=self._box.encrypt(refresh_token), updated_at=self._clock.now())
            )

    def set_state(
        self,
        account_id: int,
        state: str,
        reason: str | None = None,
        *,
        error: str | None = None,
        synced: bool = False,
        retry_at: datetime | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "state": state,
            "state_reason": reason,
            "updated_at": self._clock.now(),
            "last_error": error,
            "retry_at": retry_at,
        }
        if synced:
            values["last_sync_at"] = self._clock.now()
        with self.engine.begin() as conn:
            conn.execute(accounts_t.update().where(accounts_t.c.id == account_id).values(**values))

    def record_import(self, account_id: int, done: int, total: int) -> None:
        """A first sync's progress, for the HR app (mail_accounts.import_done / import_total)."""
        with self.engine.begin() as conn:
            conn.execute(
                accounts_t.update()
                .where(accounts_t.c.id == account_id)
                .values(import_done=done, import_total=total, updated_at=self._clock.now())
            )

    def lease_holders(self) -> dict[int, str]:
        """account id -> the node currently syncing it (unexpired lease, on the database's clock as the leases are:
        this host's own clock may be off)."""
        with self.engine.connect() as conn:
            now = database_now(conn)
            rows = conn.execute(sa.select(leases_t.c.account_id, leases_t.c.node_id).where(leases_t.c.expires_at > now))
            return {r.account_id: r.node_id for r in rows}

    def message_counts(self) -> dict[int, int]:
        """Stored (not deleted) messages per account id."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(messages_t.c.account_id, sa.func.count())
                .where(messages_t.c.deleted_at.is_(None))
                .group_by(messages_t.c.account_id)
            )
            return {r[0]: r[1] for r in rows}

    def backfilled(self, account_id: int) -> set[str]:
        """Normalized contact addresses this account's older mail was already searched for."""
        with self.engine.connect() as conn:
            return set(
                conn.execute(sa.select(backfills_t.c.email).where(backfills_t.c.account_id == account_id)).scalars()
            )

    def mark_backfilled(self, account_id: int, emails: Iterable[str]) -> None:
        fresh = sorted(set(emails) - self.backfilled(account_id))
        if not fresh:
            return
        now = self._clock.now()
        with self.engine.begin() as conn:
            conn.execute(backfills_t.insert(), [{"account_id": account_id, "email": e, "done_at": now} for e in fresh])

    def contacts_watermark(self) -> tuple[int, int | None, int | None]:
        """A cheap fingerprint of mail_contacts (count, highest id, total address length): it changes when the HR
        app adds, removes or re-addresses contacts."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.count(), sa.func.max(contacts_t.c.id), sa.func.sum(sa.func.length(contacts_t.c.email))
                )
            ).one()
        return int(row[0]), row[1], None if row[2] is None else int(row[2])

    def contact_emails(self) -> list[str]:
        """The addresses of mail_contacts (written by the HR app)."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(contacts_t.c.email)).scalars())

    # -- folders ---------------------------------------------------------------------------------------------

    def folders(self, account_id: int) -> dict[str, StoredFolder]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(folders_t).where(folders_t.c.account_id == account_id)).all()
        return {r.name: _stored_folder(r) for r in rows}

    def prepare_folders(self, account_id: int, specs: Sequence[FolderSpec]) -> dict[str, StoredFolder]:
        """The account's stored folders for the ones the server lists (``specs``, in their order), in one
        transaction: folders no longer listed are dropped with their locations (their messages are marked dirty),
        missing ones are created with an empty cursor, a changed special-use is updated. An account whose folders
        did not change costs one SELECT (a sync used to read the folder table once per folder, and twice more)."""
        wanted = {spec.name: spec.special_use for spec in specs}
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(folders_t).where(folders_t.c.account_id == account_id)).all()
            _forget_folders(conn, [r.id for r in rows if r.name not in wanted])
            stored = {r.name: _stored_folder(r) for r in rows if r.name in wanted}
            out: dict[str, StoredFolder] = {}
            for name, special_use in wanted.items():
                folder = stored.get(name)
                if folder is None:
                    insert = folders_t.insert().values(
                        account_id=account_id, name=name, special_use=special_use, last_uid=0
                    )
                    folder_id = _inserted_id(conn.execute(insert))
                    folder = StoredFolder(folder_id, name, special_use, FolderCursor(None, 0, None, None, None))
                elif folder.special_use != special_use:
                    conn.execute(folders_t.update().where(folders_t.c.id == folder.id).values(special_use=special_use))
                    folder = StoredFolder(folder.id, name, special_use, folder.cursor, folder.synced_at)
                out[name] = folder
        return out

    def ensure_folder(self, account_id: int, name: str, special_use: str | None) -> StoredFolder:
        existing = self.folders(account_id).get(name)
        if existing is not None:
            if existing.special_use != special_use:
                with self.engine.begin() as conn:
                    conn.execute(
                        folders_t.update().where(folders_t.c.id == existing.id).values(special_use=special_use)
                    )
            return StoredFolder(existing.id, name, special_use, existing.cursor, existing.synced_at)
        with self.engine.begin() as conn:
            folder_id = _inserted_id(
                conn.execute(
                    folders_t.insert().values(account_id=account_id, name=name, special_use=special_use, last_uid=0)
                )
            )
        return StoredFolder(folder_id, name, special_use, FolderCursor(None, 0, None, None, None))

    def start_full_sync(self, folder_id: int, uidvalidity: int, *, reset_locations: bool) -> list[int]:
        """Record a new UIDVALIDITY and restart from UID 0; returns the messages whose locations were dropped.

        Their marks are held by the folder until finish_folder: a re-map refused, interrupted or cut off halfway
        (the next sync goes on from the cursor) must not have the messages not re-mapped yet recomputed as gone."""
        with self.engine.begin() as conn:
            dropped: list[int] = []
            if reset_locations:
                dropped = list(
                    conn.execute(
                        sa.select(locations_t.c.message_id).where(locations_t.c.folder_id == folder_id)
                    ).scalars()
                )
                conn.execute(locations_t.delete().where(locations_t.c.folder_id == folder_id))
                _mark_dirty(conn, dropped, held_by=folder_id)
            conn.execute(
                folders_t.update()
                .where(folders_t.c.id == folder_id)
                .values(uidvalidity=uidvalidity, last_uid=0, uidnext=None, highest_modseq=None, message_count=None)
            )
        return dropped

    def finish_folder(
        self, folder_id: int, *, uidnext: int | None, highest_modseq: int | None, message_count: int
    ) -> None:
        """The folder's sync went to its end: record what SELECT said and release the marks a re-map held."""
        with self.engine.begin() as conn:
            _release_held(conn, [folder_id])
            conn.execute(
                folders_t.update()
                .where(folders_t.c.id == folder_id)
                .values(
                    uidnext=uidnext,
                    highest_modseq=highest_modseq,
                    message_count=message_count,
                    synced_at=self._clock.now(),
                )
            )

    # -- locations -------------------------------------------------------------------------------------------

    def known_uids(self, folder_id: int) -> set[int]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(locations_t.c.uid).where(locations_t.c.folder_id == folder_id)).scalars())

    def highest_uid(self, folder_id: int) -> int:
        """The highest UID stored for the folder (0 when none)."""
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(sa.func.max(locations_t.c.uid)).where(locations_t.c.folder_id == folder_id))
            return int(found.scalar() or 0)

    def remove_locations(self, folder_id: int, uids: Iterable[int]) -> list[int]:
        """Forget expunged UIDs; returns the affected message ids."""
        uid_list = sorted(uids)
        touched: list[int] = []
        with self.engine.begin() as conn:
            for chunk in chunks(uid_list):
                cond = sa.and_(locations_t.c.folder_id == folder_id, locations_t.c.uid.in_(chunk))
                touched += conn.execute(sa.select(locations_t.c.message_id).where(cond)).scalars().all()
                conn.execute(locations_t.delete().where(cond))
            _mark_dirty(conn, touched)
        return touched

    def update_flags(
        self, folder_id: int, updates: Mapping[int, tuple[tuple[str, ...] | None, int | None, list[str] | None]]
    ) -> list[int]:
        """Apply FLAGS, MODSEQ and Gmail labels of known UIDs (None: not in the reply, kept as stored); returns the
        message ids that really changed."""
        if not updates:
            return []
        touched: list[int] = []
        with self.engine.begin() as conn:
            for chunk in chunks(sorted(updates)):
                rows = conn.execute(
                    sa.select(
                        locations_t.c.uid, locations_t.c.message_id, locations_t.c.flags, locations_t.c.labels
                    ).where(locations_t.c.folder_id == folder_id, locations_t.c.uid.in_(chunk))
                ).all()
                for row in rows:
                    flags, modseq, labels = updates[row.uid]
                    new_flags = sorted(flags if flags is not None else row.flags or [])
                    if sorted(row.flags or []) == new_flags and (labels is None or row.labels == labels):
                        continue  # unchanged: no write (a full flag scan touches every UID)
                    touched.append(row.message_id)
                    values: dict[str, Any] = {"flags": new_flags, "modseq": modseq}
                    if labels is not None:
                        values["labels"] = labels
                    conn.execute(
                        locations_t.update()
                        .where(locations_t.c.folder_id == folder_id, locations_t.c.uid == row.uid)
                        .values(**values)
                    )
            _mark_dirty(conn, touched)
        return touched

    def existing_thread_keys(self, account_id: int, keys: Iterable[str]) -> set[str]:
        where = threads_t.c.account_id == account_id
        with self.engine.connect() as conn:
            return set(_lookup(conn, threads_t, threads_t.c.provider_thread_id, where, keys))

    def existing_message_ids(self, account_id: int, message_id_headers: Iterable[str]) -> set[str]:
        where = messages_t.c.account_id == account_id
        with self.engine.connect() as conn:
            return set(_lookup(conn, messages_t, messages_t.c.message_id_header, where, message_id_headers))

    def message_ids_by_identity(self, account_id: int, identities: Iterable[str]) -> dict[str, int]:
        with self.engine.connect() as conn:
            return _ids_by_identity(conn, account_id, identities)

    def store_batch(
        self,
        account_id: int,
        folder_id: int,
        messages: Sequence[NewMessage],
        known: Mapping[int, tuple[int, NewLocation]],
        *,
        last_uid: int,
    ) -> list[int]:
        """Insert new messages (with participants, attachments, thread) and locations, then move the cursor.

        One transaction per batch: a crash loses at most the batch, and the cursor never runs ahead of the rows.
        Returns the ids inserted; messages that got one more location here are marked dirty.
        """
        now = self._clock.now()
        relocated: list[int] = []
        with self._writing_messages(account_id) as conn:
            self._insert_locations(conn, folder_id, [(mid, loc) for mid, loc in known.values()])
            stored = _ids_by_identity(conn, account_id, [m.identity for m in messages])
            fresh: dict[str, NewMessage] = {}
            again: list[NewMessage] = []  # the same message twice in one batch, or found by another folder
            for msg in messages:
                if msg.identity in stored or msg.identity in fresh:
                    again.append(msg)
                else:
                    fresh[msg.identity] = msg
            inserted = self._insert_messages(conn, account_id, list(fresh.values()), now)
            ids = {**stored, **dict(zip(fresh, inserted, strict=True))}
            relocated = [ids[m.identity] for m in again]
            self._insert_locations(conn, folder_id, [(ids[m.identity], m.location) for m in (*fresh.values(), *again)])
            conn.execute(
                folders_t.update()
                .where(folders_t.c.id == folder_id, folders_t.c.last_uid < last_uid)
                .values(last_uid=last_uid)
            )
            _mark_dirty(conn, [mid for mid, _ in known.values()] + relocated)
        if inserted:
            self._table_stats.after_write()  # a first sync fills the lookup tables faster than autovacuum analyzes
        return inserted

    def store_sent(self, account_id: int, message: NewMessage) -> int:
        """The message just sent from the outbox, stored at once (outbound, threaded) before any sync sees it;
        the sync later adds its Sent location (same identity) or adopts it (Gmail, see adopt_identities).

        A row of the account with the same Message-ID is this very mail (the outbox gives each row an id of its
        own) and is returned as it is: after an attempt that may have delivered, the retry comes minutes later, and
        a sync in between stored Gmail's copy under its own identity (gm:<X-GM-MSGID>), which the "mid:" identity
        alone did not find, so the mail was stored twice, in two threads, for good."""
        now = self._clock.now()
        message_id_header = message.parsed.message_id_header
        with self._writing_messages(account_id) as conn:
            same = messages_t.c.provider_message_id == message.identity
            if message_id_header:
                same = sa.or_(same, messages_t.c.message_id_header == message_id_header)
            existing = conn.execute(
                sa.select(messages_t.c.id)
                .where(messages_t.c.account_id == account_id, same)
                # the row under our own identity first, else the oldest copy
                .order_by((messages_t.c.provider_message_id != message.identity), messages_t.c.id)
                .limit(1)
            ).scalar()
            if existing is not None:
                return int(existing)
            [message_id] = self._insert_messages(conn, account_id, [message], now)
            return message_id

    def adopt_identities(
        self, account_id: int, renames: Mapping[str, str], thread_keys: Mapping[str, str] | None = None
    ) -> dict[str, int]:
        """Give rows stored under a provisional identity (the outbox's "mid:<Message-ID>") the server's identity
        (Gmail "gm:<X-GM-MSGID>") when the sync meets them; returns {new identity: message id}."""
        adopted: dict[str, int] = {}
        with self.engine.begin() as conn:
            for chunk in chunks(sorted(renames)):  # one query per chunk: this runs for every new Gmail message
                found = conn.execute(
                    sa.select(messages_t.c.id, messages_t.c.provider_message_id).where(
                        messages_t.c.account_id == account_id, messages_t.c.provider_message_id.in_(chunk)
                    )
                ).all()
                for row in found:
                    new = renames[row.provider_message_id]
                    conn.execute(messages_t.update().where(messages_t.c.id == row.id).values(provider_message_id=new))
                    adopted[new] = int(row.id)
                    key = (thread_keys or {}).get(new)
                    if key is not None:
                        move_to_key(conn, account_id, int(row.id), key)
        return adopted

    def reply_context(self, account_id: int, message_id: int) -> tuple[str | None, tuple[str, ...], str | None] | None:
        """(Message-ID, References, subject) of a stored message of this account, for threading a reply."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(messages_t.c.message_id_header, messages_t.c.references, messages_t.c.subject).where(
                    messages_t.c.id == message_id, messages_t.c.account_id == account_id
                )
            ).first()
        if row is None:
            return None
        return row.message_id_header, tuple(row.references or ()), row.subject

    def quarantine(
        self, account_id: int, folder: str, uidvalidity: int | None, uid: int, *, reason: str, raw: bytes | None
    ) -> None:
        with self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(quarantine_t.c.id, quarantine_t.c.raw).where(
                    quarantine_t.c.account_id == account_id,
                    quarantine_t.c.folder == folder,
                    quarantine_t.c.uidvalidity == uidvalidity,
                    quarantine_t.c.uid == uid,
                )
            ).first()
            if exists is not None and exists.raw is None and raw is not None:
                # quarantined without bytes, asked for again (AccountSync._retry_bodiless): the body came, and does
                # not parse; the row keeps it now
                conn.execute(
                    quarantine_t.update()
                    .where(quarantine_t.c.id == exists.id)
                    .values(reason=reason[:2000], size_bytes=len(raw), raw=raw)
                )
            if exists is None:
                conn.execute(
                    quarantine_t.insert().values(
                        account_id=account_id,
                        folder=folder,
                        uidvalidity=uidvalidity,
                        uid=uid,
                        reason=reason[:2000],
                        size_bytes=len(raw) if raw is not None else None,
                        raw=raw,
                        created_at=self._clock.now(),
                    )
                )

    def bodiless_quarantined(self, account_id: int, folder: str, uidvalidity: int, *, since: datetime) -> list[int]:
        """UIDs of the folder's messages quarantined without bytes (no body came) at ``since`` or later."""
        with self.engine.connect() as conn:
            return sorted(
                int(uid)
                for uid in conn.execute(
                    sa.select(quarantine_t.c.uid).where(
                        quarantine_t.c.account_id == account_id,
                        quarantine_t.c.folder == folder,
                        quarantine_t.c.uidvalidity == uidvalidity,
                        quarantine_t.c.raw.is_(None),
                        quarantine_t.c.created_at >= since,
                    )
                ).scalars()
            )

    def release_quarantined(self, account_id: int, folder_id: int, uidvalidity: int, uids: Iterable[int]) -> int:
        """Delete the quarantine rows of these UIDs that the folder now has a location for (stored after all);
        returns how many."""
        with self.engine.begin() as conn:
            folder = conn.execute(sa.select(folders_t.c.name).where(folders_t.c.id == folder_id)).scalar_one()
            located = [
                int(uid)
                for chunk in chunks(sorted(set(uids)))
                for uid in conn.execute(
                    sa.select(locations_t.c.uid).where(
                        locations_t.c.folder_id == folder_id, locations_t.c.uid.in_(chunk)
                    )
                ).scalars()
            ]
            for chunk in chunks(located):
                conn.execute(
                    quarantine_t.delete().where(
                        quarantine_t.c.account_id == account_id,
                        quarantine_t.c.folder == folder,
                        quarantine_t.c.uidvalidity == uidvalidity,
                        quarantine_t.c.uid.in_(chunk),
                    )
                )
            return len(located)

    def refresh_dirty(self, account_id: int) -> int:
        """Recompute every message of the account marked dirty (by this sync or an interrupted one), then clear
        the marks; returns how many changed. Marks held by a folder whose re-map is unfinished wait (_mark_dirty)."""
        # the marks first (a handful, usually none), then which are this account's: joined the other way round,
        # SQLite walked every message of the account on each sync (~20 ms of an unchanged sync at 100k messages)
        with self.engine.connect() as conn:
            marked = list(
                conn.execute(sa.select(dirty_t.c.message_id).where(dirty_t.c.held_by_folder_id.is_(None))).scalars()
            )
            ids: list[int] = []
            for chunk in chunks(sorted(marked)):
                ids += conn.execute(
                    sa.select(messages_t.c.id).where(messages_t.c.id.in_(chunk), messages_t.c.account_id == account_id)
                ).scalars()
        if not ids:
            return 0
        changed = self.refresh_messages(account_id, ids)
        with self.engine.begin() as conn:
            for chunk in chunks(sorted(ids)):
                conn.execute(
                    dirty_t.delete().where(dirty_t.c.message_id.in_(chunk), dirty_t.c.held_by_folder_id.is_(None))
                )
        return changed

    def refresh_messages(self, account_id: int, message_ids: Iterable[int]) -> int:
        """Recompute labels, is_read and deleted_at of messages from their locations; returns how many changed."""
        ids = sorted(set(message_ids))
        if not ids:
            return 0
        now = self._clock.now()
        changed = 0
        with self.engine.begin() as conn:
            for chunk in chunks(ids):
                where: dict[int, list[tuple[list[str], list[str]]]] = {i: [] for i in chunk}
                for row in conn.execute(
                    sa.select(locations_t.c.message_id, folders_t.c.name, locations_t.c.flags, locations_t.c.labels)
                    .join(folders_t, folders_t.c.id == locations_t.c.folder_id)
                    .where(locations_t.c.message_id.in_(chunk))
                ):
                    # Gmail locations carry their labels; elsewhere the folder is the label
                    labels = row.labels if row.labels is not None else [row.name]
                    where[row.message_id].append((labels, row.flags or []))
                current = {
                    r.id: r
                    for r in conn.execute(
                        sa.select(
                            messages_t.c.id, messages_t.c.labels, messages_t.c.is_read, messages_t.c.deleted_at
                        ).where(messages_t.c.id.in_(chunk), messages_t.c.account_id == account_id)
                    )
                }
                for message_id, places in where.items():
                    msg = current.get(message_id)
                    if msg is None:
                        continue
                    labels = sorted({label for names, _ in places for label in names})
                    is_read = any("\\Seen" in flags for _, flags in places)
                    deleted_at = None if places else (msg.deleted_at or now)
                    if (msg.labels or []) != labels or msg.is_read != is_read or msg.deleted_at != deleted_at:
                        changed += 1
                        conn.execute(
                            messages_t.update()
                            .where(messages_t.c.id == message_id)
                            .values(labels=labels, is_read=is_read, deleted_at=deleted_at, updated_at=now)
                        )
        return changed

    # -- internals -------------------------------------------------------------------------------------------

    @staticmethod
    def _insert_locations(conn: sa.Connection, folder_id: int, rows: Sequence[tuple[int, NewLocation]]) -> None:
        if not rows:
            return
        uids = [loc.uid for _, loc in rows]
        present = set()
        for among_uids in among(conn, locations_t.c.uid, uids):
            present |= set(
                conn.execute(
                    sa.select(locations_t.c.uid).where(locations_t.c.folder_id == folder_id, among_uids)
                ).scalars()
            )
        fresh = [
            {
                "folder_id": folder_id,
                "uid": loc.uid,
                "message_id": mid,
                "flags": sorted(loc.flags),
                "labels": loc.labels,
                "modseq": loc.modseq,
            }
            for mid, loc in rows
            if loc.uid not in present
        ]
        insert_rows(conn, locations_t, fresh)

    def _insert_messages(
        self, conn: sa.Connection, account_id: int, messages: Sequence[NewMessage], now: datetime
    ) -> list[int]:
        """Insert new messages (identities not stored yet, each once) with their threads, participants and
        attachments: a handful of statements for the whole batch. Returns their ids, in order."""
        if not messages:
            return []
        blobs_stored = self._put_blobs(messages)
        inputs = [ThreadInput(m.parsed, m.identity, m.thread_key) for m in messages]
        plan = load_threads(conn, account_id, inputs, now)
        threads = [plan.assign(thread_input) for thread_input in inputs]
        write_threads(conn, account_id, plan)
        rows = []
        for msg, thread in zip(messages, threads, strict=True):
            p = msg.parsed
            rows.append(
                {
                    "account_id": account_id,
                    "provider_message_id": msg.identity,
                    "message_id_header": p.message_id_header,
                    "in_reply_to": p.in_reply_to,
                    "references": list(p.references),
                    "thread_id": plan.thread_id(thread),
                    "subject": p.subject,
                    "from_email": p.from_email,
                    "from_name": p.from_name,
                    "sent_at": p.sent_at,
                    "received_at": msg.received_at or p.sent_at,
                    "direction": msg.direction,
                    "snippet": p.snippet,
                    "body_text": p.body_text,
                    "body_html": p.body_html,
                    "is_read": "\\Seen" in msg.location.flags,
                    "labels": msg.location.labels if msg.location.labels is not None else [msg.folder_name],
                    "size_bytes": p.size_bytes,
                    "has_attachments": p.has_attachments,
                    "deleted_at": None,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        ids = insert_returning_ids(conn, messages_t, rows)
        participants = [
            {
                "message_id": message_id,
                "role": x.role,
                "email": x.email,
                "name": x.name,
                "address_key": normalize_address(x.email),
            }
            for message_id, msg in zip(ids, messages, strict=True)
            for x in msg.parsed.participants
        ]
        insert_rows(conn, participants_t, participants)
        # the files parser workers staged: into place now, durably, before the commit
        staged = [(a.sha256, a.staged) for m in messages for a in m.parsed.attachments if a.staged is not None]
        adopted, adopted_durable = (
            self._blobs.adopt_all(staged) if staged and self._blobs is not None else (set(), lambda: None)
        )
        attachments = []
        for message_id, msg in zip(ids, messages, strict=True):
            for att in msg.parsed.attachments:
                stored = att.sha256 in adopted if att.staged is not None else bool(att.data) and self._blobs is not None
                attachments.append(
                    {
                        "message_id": message_id,
                        "filename": att.filename,
                        "content_type": att.content_type,
                        "size_bytes": att.size_bytes,
                        "content_id": att.content_id,
                        "is_inline": att.is_inline,
                        "sha256": att.sha256,
                        "stored": stored,
                    }
                )
        insert_rows(conn, attachments_t, attachments)
        blobs_stored()  # before the caller commits: a row with stored = true names a file that is on disk
        adopted_durable()
        return ids

    def sweep_staged_attachments(self) -> int:
        """Delete attachment files that parser processes staged for runs never stored (BlobStore.sweep_staging),
        once they are STAGED_MAX_AGE old, after putting back those a dead collection left aside
        (BlobStore.restore_abandoned); a failure is logged, not raised. Returns how many were deleted."""
        if self._blobs is None:
            return 0
        restore_abandoned(self._blobs)
        try:
            removed = self._blobs.sweep_staging(STAGED_MAX_AGE.total_seconds())
        except OSError as exc:
            log.warning("store.staging_sweep_failed", error=exc.strerror or type(exc).__name__)
            return 0
        if removed:
            log.info("store.staging_swept", files=removed)
        return removed

    def collect_attachment_garbage(self, *, dry_run: bool = False) -> GcReport | None:
        """Delete the attachment files no row names (inboxd.blob_gc); None without an attachment store. Logs
        ``store.attachments_collected``; a filesystem error is logged (``store.attachment_gc_failed``) and None."""
        if self._blobs is None:
            return None
        try:
            # the files' clock, not the injected one: it is compared with their modification times
            report = collect_garbage(self.engine, self._blobs, now=time.time(), dry_run=dry_run)
        except OSError as exc:
            log.warning("store.attachment_gc_failed", error=exc.strerror or type(exc).__name__)
            return None
        except Exception as exc:  # the database away, or a bug: logged here, in a thread of its own otherwise unseen
            log.warning("store.attachment_gc_failed", error=type(exc).__name__)
            return None
        log.info("store.attachments_collected", **report.as_dict())
        return report

    def _put_blobs(self, messages: Sequence[NewMessage]) -> Callable[[], None]:
        """Start writing the attachments' bytes (see BlobStore.put_all); returns the wait."""
        if self._blobs is None:
            return lambda: None
        return self._blobs.put_all((a.sha256, a.data) for m in messages for a in m.parsed.attachments if a.data)
