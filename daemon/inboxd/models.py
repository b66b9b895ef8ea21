"""The database schema: the HR-app contract (mail_* tables) and inboxd's private state.

docs/schema.md documents every table; Alembic migrations under migrations/ create them. Change both together.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def bulk_bind_processor(self, dialect: sa.Dialect) -> Callable[[datetime | None], Any] | None:
        """What bind_processor gives (process_bind_param, then the dialect's own DATETIME processor), in one
        function for inboxd.bulk: on SQLite the text SQLAlchemy stores ("YYYY-MM-DD HH:MM:SS.ffffff", UTC)
        straight from isoformat, not through two calls and a %-format per value (a sixteenth of the daemon's
        time in a first sync: four timestamps per message). tests/test_bulk.py checks the two agree."""
        if dialect.name != "sqlite":
            return self.bind_processor(dialect)
        return _sqlite_utc_text


def _sqlite_utc_text(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT identities.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _id() -> Any:
    return Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index))


def _fk(target: str, *, nullable: bool = False, index: bool = True, ondelete: str = "CASCADE") -> Any:
    return Field(
        default=None,
        sa_column=sa.Column(BigId, sa.ForeignKey(target, ondelete=ondelete), nullable=nullable, index=index),
    )


ACCOUNT_STATES = ("active", "paused", "disabled", "needs_reauth", "error")


class MailAccount(SQLModel, table=True):
    __tablename__ = "mail_accounts"

    id: int | None = _id()
    email: str = Field(sa_column=sa.Column(sa.String(320), nullable=False, unique=True))
    provider: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    hr_user_ref: str | None = Field(default=None, sa_column=sa.Column(sa.String(255), index=True))
    enabled: bool = Field(default=True, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.true()))
    state: str = Field(
        default="active",
        sa_column=sa.Column(sa.String(32), nullable=False, server_default="active"),
    )
    state_reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_sync_at: datetime | None = _ts()
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    # set while inboxd leaves the account alone (provider quota): no IMAP before this time
    retry_at: datetime | None = _ts()
    created_at: datetime | None = _ts(nullable=False)
    updated_at: datetime | None = _ts(nullable=False)
    # the first sync (the import) of the mailbox: messages processed and to process in the current attempt
    import_done: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    import_total: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))

    __table_args__ = (
        sa.CheckConstraint(
            "state IN ('active','paused','disabled','needs_reauth','error')", name="ck_mail_accounts_state"
        ),
    )


class MailCredential(SQLModel, table=True):
    """Encrypted credentials; outside the HR read contract (the HR app's DB user needs no grant on it)."""

    __tablename__ = "inboxd_credentials"

    account_id: int | None = Field(
        default=None,
        sa_column=sa.Column(BigId, sa.ForeignKey("mail_accounts.id", ondelete="CASCADE"), primary_key=True),
    )
    kind: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))  # 'oauth2_refresh' | 'password'
    secret: bytes = Field(sa_column=sa.Column(sa.LargeBinary, nullable=False))
    updated_at: datetime | None = _ts(nullable=False)


class MailFolder(SQLModel, table=True):
    """Per-folder sync cursor: (UIDVALIDITY, last UID, HIGHESTMODSEQ) and the last STATUS seen."""

    __tablename__ = "inboxd_folders"

    id: int | None = _id()
    account_id: int | None = _fk("mail_accounts.id")
    name: str = Field(sa_column=sa.Column(sa.String(1024), nullable=False))
    special_use: str | None = Field(default=None, sa_column=sa.Column(sa.String(32)))
    uidvalidity: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    last_uid: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False, server_default="0"))
    uidnext: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    highest_modseq: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    message_count: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    synced_at: datetime | None = _ts()

    __table_args__ = (sa.UniqueConstraint("account_id", "name", name="uq_inboxd_folders_account_name"),)


class MailThread(SQLModel, table=True):
    __tablename__ = "mail_threads"

    id: int | None = _id()
    account_id: int | None = _fk("mail_accounts.id")
    provider_thread_id: str = Field(sa_column=sa.Column(sa.String(1024), nullable=False))
    subject: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    first_message_at: datetime | None = _ts()
    last_message_at: datetime | None = _ts()
    message_count: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))

    __table_args__ = (sa.UniqueConstraint("account_id", "provider_thread_id", name="uq_mail_threads_account_thread"),)


class MailMessage(SQLModel, table=True):
    __tablename__ = "mail_messages"

    id: int | None = _id()
    account_id: int | None = _fk("mail_accounts.id", index=False)
    provider_message_id: str = Field(sa_column=sa.Column(sa.String(1024), nullable=False))
    message_id_header: str | None = Field(default=None, sa_column=sa.Column(sa.String(1024), index=True))
    in_reply_to: str | None = Field(default=None, sa_column=sa.Column(sa.String(1024), index=True))
    references: list[str] | None = Field(default=None, sa_column=sa.Column("references", sa.JSON))
    thread_id: int | None = _fk("mail_threads.id", nullable=True, ondelete="SET NULL")
    subject: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    from_email: str | None = Field(default=None, sa_column=sa.Column(sa.String(320), index=True))
    from_name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    sent_at: datetime | None = _ts()
    received_at: datetime | None = _ts(index=True)
    direction: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    snippet: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    body_text: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    body_html: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    is_read: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()))
    labels: list[str] | None = Field(default=None, sa_column=sa.Column(sa.JSON))
    size_bytes: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    has_attachments: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    deleted_at: datetime | None = _ts()
    created_at: datetime | None = _ts(nullable=False)
    updated_at: datetime | None = _ts(nullable=False)

    __table_args__ = (
        sa.UniqueConstraint("account_id", "provider_message_id", name="uq_mail_messages_account_provider_id"),
        sa.CheckConstraint("direction IN ('inbound','outbound')", name="ck_mail_messages_direction"),
        # the thread lookups (threads.load_threads: references and replies), per account (migration 0009)
        sa.Index("ix_mail_messages_account_message_id", "account_id", "message_id_header"),
        sa.Index("ix_mail_messages_account_in_reply_to", "account_id", "in_reply_to"),
    )


class MailLocation(SQLModel, table=True):
    """Where a message sits on the server: (folder, UID) -> message; the basis of expunge detection."""

    __tablename__ = "inboxd_locations"

    folder_id: int | None = Field(
        default=None,
        sa_column=sa.Column(BigId, sa.ForeignKey("inboxd_folders.id", ondelete="CASCADE"), primary_key=True),
    )
    uid: int = Field(sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=False))
    message_id: int | None = _fk("mail_messages.id")
    flags: list[str] | None = Field(default=None, sa_column=sa.Column(sa.JSON))
    modseq: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    # Gmail: the message's normalized labels (X-GM-LABELS); NULL on other servers, where labels are folder names
    labels: list[str] | None = Field(default=None, sa_column=sa.Column(sa.JSON))


class MailParticipant(SQLModel, table=True):
    __tablename__ = "mail_participants"

    id: int | None = _id()
    message_id: int | None = _fk("mail_messages.id")
    role: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    email: str = Field(sa_column=sa.Column(sa.String(320), nullable=False, index=True))
    name: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    # scope.normalize_address(email): what a contact matches (view mail_contact_messages, forgetting)
    address_key: str = Field(default="", sa_column=sa.Column(sa.String(320), nullable=False))

    __table_args__ = (
        sa.CheckConstraint("role IN ('from','to','cc','bcc','reply_to')", name="ck_mail_participants_role"),
        # (key, message): a contact's messages straight from the index, one entry per message and key
        sa.Index("ix_mail_participants_address_key", "address_key", "message_id"),
    )


class MailAttachment(SQLModel, table=True):
    __tablename__ = "mail_attachments"

    id: int | None = _id()
    message_id: int | None = _fk("mail_messages.id")
    filename: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    content_type: str = Field(sa_column=sa.Column(sa.String(255), nullable=False))
    size_bytes: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    content_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(1024)))
    is_inline: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()))
    sha256: str = Field(sa_column=sa.Column(sa.String(64), nullable=False, index=True))
    stored: bool = Field(default=True, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.true()))


class MailContact(SQLModel, table=True):
    """Written by the HR app: the candidates whose mail is in scope."""

    __tablename__ = "mail_contacts"

    id: int | None = _id()
    email: str = Field(sa_column=sa.Column(sa.String(320), nullable=False, unique=True))
    hr_contact_ref: str | None = Field(default=None, sa_column=sa.Column(sa.String(255), index=True))
    created_at: datetime | None = Field(
        default=None,
        sa_column=sa.Column(UTCDateTime(), nullable=False, server_default=sa.func.current_timestamp()),
    )


class MailQuarantine(SQLModel, table=True):
    """Messages that could not be parsed at all, kept with the reason so nothing is silently lost."""

    __tablename__ = "mail_quarantine"

    id: int | None = _id()
    account_id: int | None = _fk("mail_accounts.id")
    folder: str = Field(sa_column=sa.Column(sa.String(1024), nullable=False))
    uidvalidity: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    uid: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    reason: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    size_bytes: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger))
    raw: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary))
    created_at: datetime | None = _ts(nullable=False)

    __table_args__ = (
        sa.UniqueConstraint("account_id", "folder", "uidvalidity", "uid", name="uq_mail_quarantine_location"),
    )


metadata = SQLModel.metadata


OUTBOX_STATUSES = ("queued", "sending", "sent", "failed", "cancelled")


class MailOutbox(SQLModel, table=True):
    """Mail the HR app asks inboxd to send from a recruiter's mailbox. The HR app inserts rows (status 'queued')
    and may set status 'cancelled' while a row is still queued; inboxd owns every other column."""

    __tablename__ = "mail_outbox"

    id: int | None = _id()
    account_id: int | None = _fk("mail_accounts.id")
    to: list[str] | None = Field(default=None, sa_column=sa.Column("to", sa.JSON, nullable=False))
    cc: list[str] | None = Field(default=None, sa_column=sa.Column(sa.JSON))
    bcc: list[str] | None = Field(default=None, sa_column=sa.Column(sa.JSON))
    subject: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False, server_default=""))
    body_text: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    body_html: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    reply_to_message_id: int | None = _fk("mail_messages.id", nullable=True, index=False, ondelete="SET NULL")
    # [{"sha256": ..., "filename": ..., "content_type": ...}], bytes in the attachment store
    attachments: list[dict[str, str]] | None = Field(default=None, sa_column=sa.Column(sa.JSON))
    idempotency_key: str = Field(sa_column=sa.Column(sa.String(255), nullable=False, unique=True))
    status: str = Field(
        default="queued", sa_column=sa.Column(sa.String(16), nullable=False, server_default="queued", index=True)
    )
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    next_attempt_at: datetime | None = _ts()
    message_id_header: str | None = Field(default=None, sa_column=sa.Column(sa.String(1024)))
    sent_at: datetime | None = _ts()
    sent_message_id: int | None = _fk("mail_messages.id", nullable=True, index=False, ondelete="SET NULL")
    claimed_at: datetime | None = _ts()  # inboxd: when the current attempt started (stale 'sending' = crashed)
    # inboxd: set (and committed) right before a message is handed to SMTP, cleared when the server's answer is
    # known; still set on the next attempt = it may have been delivered (a crash or a connection lost after DATA)
    delivery_uncertain: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    created_at: datetime | None = Field(
        default=None,
        sa_column=sa.Column(UTCDateTime(), nullable=False, server_default=sa.func.current_timestamp()),
    )

    __table_args__ = (
        sa.CheckConstraint("status IN ('queued','sending','sent','failed','cancelled')", name="ck_mail_outbox_status"),
    )


class ContactBackfill(SQLModel, table=True):
    """Private: which contact addresses an account's older mail has been searched for (scope "contacts")."""

    __tablename__ = "inboxd_backfills"

    account_id: int | None = Field(
        default=None,
        sa_column=sa.Column(BigId, sa.ForeignKey("mail_accounts.id", ondelete="CASCADE"), primary_key=True),
    )
    email: str = Field(sa_column=sa.Column(sa.String(320), primary_key=True))  # normalized (scope.normalize_address)
    done_at: datetime | None = _ts(nullable=False)


class DirtyMessage(SQLModel, table=True):
    """Private: messages whose labels / is_read / deleted_at must be recomputed from their locations. Written in
    the same transaction as the location change, cleared after the recompute, so an interrupted sync loses nothing.
    A mark held by a folder (its locations dropped by a UIDVALIDITY change) waits until that folder's re-map is
    finished (migration 0011)."""

    __tablename__ = "inboxd_dirty"

    message_id: int | None = Field(
        default=None,
        sa_column=sa.Column(BigId, sa.ForeignKey("mail_messages.id", ondelete="CASCADE"), primary_key=True),
    )
    # inboxd_folders.id (no foreign key: released by Store.finish_folder, and when the folder is forgotten)
    held_by_folder_id: int | None = Field(default=None, sa_column=sa.Column(BigId, nullable=True))


class Node(SQLModel, table=True):
    """Private: the inboxd processes sharing this database, with their last heartbeat."""

    __tablename__ = "inboxd_nodes"

    node_id: str = Field(sa_column=sa.Column(sa.String(255), primary_key=True))
    heartbeat_at: datetime | None = _ts(nullable=False)


class AccountLease(SQLModel, table=True):
    """Private: which node syncs an account, until when (renewed well before it expires)."""

    __tablename__ = "inboxd_leases"

    account_id: int | None = Field(
        default=None,
        sa_column=sa.Column(BigId, sa.ForeignKey("mail_accounts.id", ondelete="CASCADE"), primary_key=True),
    )
    node_id: str = Field(sa_column=sa.Column(sa.String(255), nullable=False, index=True))
    expires_at: datetime | None = _ts(nullable=False)
