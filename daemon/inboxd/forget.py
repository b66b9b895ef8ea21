"""Forgetting a contact (GDPR erasure): `inboxd contacts forget EMAIL`.

Owns which messages go (`plan_erasure`, pure), their deletion with everything hanging off them in one transaction,
and the removal of attachment bytes that no remaining row needs, after the commit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
import structlog

from inboxd.blobs import BlobStore
from inboxd.bulk import chunks
from inboxd.models import (
    ContactBackfill,
    MailAttachment,
    MailContact,
    MailLocation,
    MailMessage,
    MailOutbox,
    MailParticipant,
    MailThread,
)
from inboxd.scope import normalize_address

log = structlog.get_logger(__name__)

attachments_t = MailAttachment.__table__  # type: ignore[attr-defined]
backfills_t = ContactBackfill.__table__  # type: ignore[attr-defined]
contacts_t = MailContact.__table__  # type: ignore[attr-defined]
locations_t = MailLocation.__table__  # type: ignore[attr-defined]
messages_t = MailMessage.__table__  # type: ignore[attr-defined]
outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]
# how long before a file's row is committed a sync may have written or claimed the file: a batch's store, seconds
IN_FLIGHT = timedelta(minutes=5)
participants_t = MailParticipant.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """What the erasure decision needs to know about one stored message."""

    thread_id: int | None
    keys: frozenset[str]  # the address_key of each participant


@dataclass(frozen=True, slots=True)
class Erasure:
    delete: frozenset[int]  # message ids
    shared: frozenset[int]  # on the forgotten address but also on another contact's: kept


def plan_erasure(key: str, messages: Mapping[int, StoredMessage], other_contacts: frozenset[str]) -> Erasure:
    """Which messages go when the address `key` is forgotten.

    `messages` holds every message with a participant `key` and every other message of their threads. A message
    with `key` goes unless another contact is on it too. The rest of a conversation goes with it when no remaining
    message of that conversation is another contact's: such messages (an internal forward, a reply without the
    candidate) were stored only because the conversation touched this contact (scope "contacts").
    """
    linked = {m for m, facts in messages.items() if key in facts.keys}
    shared = {m for m in linked if messages[m].keys & other_contacts}
    delete = linked - shared
    threads = {messages[m].thread_id for m in delete} - {None}
    for thread_id in threads:
        rest = {m for m, facts in messages.items() if facts.thread_id == thread_id and m not in delete}
        if not any(messages[m].keys & other_contacts for m in rest):
            delete |= rest
    return Erasure(frozenset(delete), frozenset(shared))


@dataclass(slots=True)
class ForgetReport:
    """What forgetting removed (or, on a dry run, would remove)."""

    address_key: str
    contacts: int = 0
    messages: int = 0
    shared_kept: int = 0
    participants: int = 0
    attachments: int = 0
    locations: int = 0
    threads_deleted: int = 0
    threads_updated: int = 0
    backfills: int = 0
    blobs_deleted: int = 0
    blobs_kept: int = 0
    dry_run: bool = False
    attachment_shas: set[str] = field(default_factory=set, repr=False)  # of the erased attachment rows

    @property
    def found(self) -> bool:
        return bool(self.contacts or self.messages or self.shared_kept or self.backfills)

    def counts(self) -> dict[str, int]:
        return {
            "contacts": self.contacts,
            "messages": self.messages,
            "participants": self.participants,
            "attachments": self.attachments,
            "locations": self.locations,
            "threads_deleted": self.threads_deleted,
            "threads_updated": self.threads_updated,
            "backfills": self.backfills,
            "attachment_files_deleted": self.blobs_deleted,
            "attachment_files_kept": self.blobs_kept,
            "messages_kept_shared": self.shared_kept,
        }


def forget_contact(engine: sa.Engine, blobs: BlobStore | None, email: str, *, dry_run: bool = False) -> ForgetReport:
    """Erase the contact(s) with this address (Gmail dot/+tag variants included) and their mail.

    Also works when the HR app has already deleted the mail_contacts row: the mail is found by its participants.
    One transaction (rolled back when `dry_run`); attachment files go after the commit, once no remaining
    mail_attachments row and no mail_outbox row names their sha256.
    """
    key = normalize_address(email)
    report = ForgetReport(address_key=key, dry_run=dry_run)
    # the files' clock, not an injected one: compared with their modification times (see delete_unused_blobs)
    started = time.time()
    with engine.connect() as conn, conn.begin() as tx:
        _erase(conn, key, report)
        if dry_run:
            tx.rollback()
    if not dry_run:
        delete_unused_blobs(engine, blobs, report, unchanged_since=started)
        log.info("contacts.forgotten", **report.counts())  # counts only: the erased address stays out of the logs
    return report


def _erase(conn: sa.Connection, key: str, report: ForgetReport) -> None:
    contact_rows = conn.execute(sa.select(contacts_t.c.id, contacts_t.c.email)).all()
    forgotten = [r.id for r in contact_rows if normalize_address(r.email) == key]
    others = frozenset(normalize_address(r.email) for r in contact_rows if r.id not in forgotten and "@" in r.email)

    linked = set(
        conn.execute(
            sa.select(participants_t.c.message_id).where(participants_t.c.address_key == key).distinct()
        ).scalars()
    )
    threads: dict[int, int | None] = {}  # message id -> thread id, for the linked messages and their thread-mates
    for chunk in chunks(sorted(linked)):
        threads |= {
            r.id: r.thread_id
            for r in conn.execute(sa.select(messages_t.c.id, messages_t.c.thread_id).where(messages_t.c.id.in_(chunk)))
        }
    for chunk in chunks(sorted({t for t in threads.values() if t is not None})):
        threads |= {
            r.id: r.thread_id
            for r in conn.execute(
                sa.select(messages_t.c.id, messages_t.c.thread_id).where(messages_t.c.thread_id.in_(chunk))
            )
        }
    keys: dict[int, set[str]] = {m: set() for m in threads}
    for chunk in chunks(sorted(threads)):
        for row in conn.execute(
            sa.select(participants_t.c.message_id, participants_t.c.address_key).where(
                participants_t.c.message_id.in_(chunk)
            )
        ):
            keys[row.message_id].add(row.address_key)
    erasure = plan_erasure(
        key, {m: StoredMessage(threads[m], frozenset(keys[m])) for m in threads}, other_contacts=others
    )
    report.shared_kept = len(erasure.shared)
    delete_messages(conn, erasure.delete, report)
    _refresh_threads(conn, {t for m in erasure.delete if (t := threads[m]) is not None}, report)
    report.backfills = _delete(conn, backfills_t, backfills_t.c.email == key)
    for chunk in chunks(sorted(forgotten)):
        report.contacts += _delete(conn, contacts_t, contacts_t.c.id.in_(chunk))


def _delete(conn: sa.Connection, table: sa.Table, where: sa.ColumnElement[bool]) -> int:
    return conn.execute(table.delete().where(where)).rowcount


def delete_messages(conn: sa.Connection, message_ids: Iterable[int], report: ForgetReport) -> None:
    # Children are deleted explicitly (not left to ON DELETE CASCADE) so that the report counts them.
    for chunk in chunks(sorted(message_ids)):
        report.attachment_shas |= set(
            conn.execute(
                sa.select(attachments_t.c.sha256).where(
                    attachments_t.c.message_id.in_(chunk), attachments_t.c.stored.is_(True)
                )
            ).scalars()
        )
        report.participants += _delete(conn, participants_t, participants_t.c.message_id.in_(chunk))
        report.attachments += _delete(conn, attachments_t, attachments_t.c.message_id.in_(chunk))
        report.locations += _delete(conn, locations_t, locations_t.c.message_id.in_(chunk))
        # mail_outbox.reply_to_message_id / sent_message_id become NULL (ON DELETE SET NULL)
        report.messages += _delete(conn, messages_t, messages_t.c.id.in_(chunk))


def _refresh_threads(conn: sa.Connection, thread_ids: Iterable[int], report: ForgetReport) -> None:
    """Delete threads left empty; recount the others and take their dates and subject from what remains."""
    for thread_id in sorted(thread_ids):
        rest = conn.execute(
            sa.select(messages_t.c.sent_at, messages_t.c.created_at, messages_t.c.subject).where(
                messages_t.c.thread_id == thread_id
            )
        ).all()
        if not rest:
            report.threads_deleted += _delete(conn, threads_t, threads_t.c.id == thread_id)
            continue
        when: list[datetime] = sorted(r.sent_at or r.created_at for r in rest)
        subject = conn.execute(sa.select(threads_t.c.subject).where(threads_t.c.id == thread_id)).scalar()
        subjects = [r.subject for r in sorted(rest, key=lambda r: r.sent_at or r.created_at)]
        conn.execute(
            threads_t.update()
            .where(threads_t.c.id == thread_id)
            .values(
                message_count=len(rest),
                first_message_at=when[0],
                last_message_at=when[-1],
                # the subject came from the first message stored; it may have been an erased one
                subject=subject if subject in subjects else subjects[0],
            )
        )
        report.threads_updated += 1


def delete_unused_blobs(
    engine: sa.Engine, blobs: BlobStore | None, report: ForgetReport, *, unchanged_since: float
) -> None:
    """Delete the files of the erased attachments that no row names any more, unless one was written or claimed
    less than IN_FLIGHT before ``unchanged_since`` (when the erasure began) or after it: a sync storing the same
    bytes again claims the file before it commits the row naming it (BlobStore.remove_unused), and that row may
    not be committed yet. Such a file is counted as kept; the daily collection (inboxd.blob_gc) removes it once
    no row names it."""
    cutoff = unchanged_since - IN_FLIGHT.total_seconds()
    if blobs is None or not report.attachment_shas:
        return
    with engine.connect() as conn:
        still_used = _shas_in_use(conn, report.attachment_shas)
    failed = 0
    for sha256 in sorted(report.attachment_shas):
        if sha256 in still_used:
            report.blobs_kept += 1
            continue
        try:
            removed = blobs.remove_unused(sha256, unchanged_since=cutoff)
        except OSError as exc:  # permissions: the rows are gone already; the other files still go
            failed += 1
            if failed == 1:
                log.warning("forget.attachment_delete_failed", error=exc.strerror or type(exc).__name__)
            report.blobs_kept += 1  # still there: the daily collection tries again
            continue
        if removed:
            report.blobs_deleted += 1
        elif blobs.has(sha256):
            report.blobs_kept += 1


def _shas_in_use(conn: sa.Connection, shas: Sequence[str] | set[str]) -> set[str]:
    used: set[str] = set()
    for chunk in chunks(sorted(shas)):
        used |= set(conn.execute(sa.select(attachments_t.c.sha256).where(attachments_t.c.sha256.in_(chunk))).scalars())
    # mail_outbox rows (the HR app's) name attachment bytes by sha256 in a JSON list
    for sha256 in set(shas) - used:
        named = conn.execute(
            sa.select(outbox_t.c.id).where(sa.cast(outbox_t.c.attachments, sa.Text).contains(sha256)).limit(1)
        ).first()
        if named is not None:
            used.add(sha256)
    return used
