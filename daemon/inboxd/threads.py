"""Conversation threads for servers without X-GM-THRID: References / In-Reply-To, merged when replies arrive first.

A thread is keyed by its root Message-ID (first References id, else In-Reply-To, else the message's own id).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from inboxd.models import MailMessage, MailThread
from inboxd.parse import ParsedMessage

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]


def thread_root(p: ParsedMessage) -> str | None:
    return (p.references[0] if p.references else None) or p.in_reply_to or p.message_id_header


def assign_thread(
    conn: sa.Connection, account_id: int, p: ParsedMessage, identity: str, now: datetime, *, key: str | None = None
) -> int:
    """The thread id for a message about to be inserted; creates, joins or merges threads as needed.

    `key` is the server's own conversation id (Gmail X-GM-THRID): used as is. Without it, order of arrival does
    not matter: a reply stored before its parent starts a thread, and when the parent arrives, threads whose
    messages answer it are merged into the parent's. Only a reply with no references at all is grouped by its
    subject.
    """
    when = p.sent_at or now
    if key is not None:
        existing = conn.execute(
            sa.select(threads_t.c.id).where(threads_t.c.account_id == account_id, threads_t.c.provider_thread_id == key)
        ).scalar()
        if existing is None:
            return _create(conn, account_id, key, p.subject, when)
        _add(conn, existing, p.subject, when, count=1)
        return int(existing)
    root = thread_root(p)
    refs = list(dict.fromkeys(r for r in (*p.references, p.in_reply_to) if r))  # In-Reply-To repeats a reference
    thread_id = None
    if root:
        thread_id = conn.execute(
            sa.select(threads_t.c.id).where(
                threads_t.c.account_id == account_id, threads_t.c.provider_thread_id == root
            )
        ).scalar()
    if thread_id is None and refs:
        thread_id = conn.execute(
            sa.select(messages_t.c.thread_id)
            .where(
                messages_t.c.account_id == account_id,
                messages_t.c.message_id_header.in_(refs),
                messages_t.c.thread_id.is_not(None),
            )
            .limit(1)
        ).scalar()
    if thread_id is None and not refs:
        thread_id = _by_subject(conn, account_id, p.subject, when)
    if thread_id is None:
        thread_id = _create(conn, account_id, root or f"single:{identity}", p.subject, when)
    else:
        _add(conn, thread_id, p.subject, when, count=1)
    if p.message_id_header:
        _merge_answers(conn, account_id, thread_id, p.message_id_header)
    return int(thread_id)


REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|vs|tr|antw|rif)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
SUBJECT_WINDOW = timedelta(days=60)


def base_subject(subject: str | None) -> tuple[str, bool]:
    """("lowercased subject without Re:/Fwd:/AW: prefixes", whether it had one)."""
    text = " ".join((subject or "").split())
    stripped = REPLY_PREFIX.sub("", text)
    return stripped.lower(), stripped != text


def _by_subject(conn: sa.Connection, account_id: int, subject: str | None, when: datetime) -> int | None:
    """Last resort for a reply that carries no References/In-Reply-To (some clients drop them): the most recent
    thread of the account whose subject is this one without its "Re:" prefix, active within SUBJECT_WINDOW."""
    base, is_reply = base_subject(subject)
    if not is_reply or not base:
        return None
    found = conn.execute(
        sa.select(threads_t.c.id)
        .where(
            threads_t.c.account_id == account_id,
            sa.func.lower(threads_t.c.subject) == base,
            threads_t.c.last_message_at >= when - SUBJECT_WINDOW,
        )
        .order_by(threads_t.c.last_message_at.desc())
        .limit(1)
    ).scalar()
    return int(found) if found is not None else None


def _create(conn: sa.Connection, account_id: int, key: str, subject: str | None, when: datetime) -> int:
    result = conn.execute(
        threads_t.insert().values(
            account_id=account_id,
            provider_thread_id=key,
            subject=subject,
            first_message_at=when,
            last_message_at=when,
            message_count=1,
        )
    )
    key_row = result.inserted_primary_key
    if key_row is None:
        raise RuntimeError("INSERT returned no primary key")
    return int(key_row[0])


def _add(
    conn: sa.Connection,
    thread_id: int,
    subject: str | None,
    when: datetime,
    *,
    count: int,
    last: datetime | None = None,
) -> None:
    row = conn.execute(sa.select(threads_t).where(threads_t.c.id == thread_id)).one()
    conn.execute(
        threads_t.update()
        .where(threads_t.c.id == thread_id)
        .values(
            message_count=row.message_count + count,
            first_message_at=min(row.first_message_at or when, when),
            last_message_at=max(row.last_message_at or when, last or when),
            subject=row.subject or subject,
        )
    )


def _merge_answers(conn: sa.Connection, account_id: int, thread_id: int, message_id_header: str) -> None:
    """Fold into `thread_id` the threads of stored messages that answer this one (they arrived first)."""
    others = set(
        conn.execute(
            sa.select(messages_t.c.thread_id).where(
                messages_t.c.account_id == account_id,
                messages_t.c.in_reply_to == message_id_header,
                messages_t.c.thread_id.is_not(None),
                messages_t.c.thread_id != thread_id,
            )
        ).scalars()
    )
    for other in sorted(others):
        row = conn.execute(sa.select(threads_t).where(threads_t.c.id == other)).one()
        conn.execute(messages_t.update().where(messages_t.c.thread_id == other).values(thread_id=thread_id))
        _add(conn, thread_id, row.subject, row.first_message_at, count=row.message_count, last=row.last_message_at)
        conn.execute(threads_t.delete().where(threads_t.c.id == other))


def move_to_key(conn: sa.Connection, account_id: int, message_id: int, key: str) -> None:
    """Put a stored message into the thread the server names (Gmail X-GM-THRID), e.g. a message sent from the
    outbox, threaded by References when it was stored, once the sync learns Gmail's conversation id."""
    row = conn.execute(
        sa.select(messages_t.c.thread_id, messages_t.c.subject, messages_t.c.sent_at).where(
            messages_t.c.id == message_id
        )
    ).one()
    target = conn.execute(
        sa.select(threads_t.c.id).where(threads_t.c.account_id == account_id, threads_t.c.provider_thread_id == key)
    ).scalar()
    if target is not None and target == row.thread_id:
        return
    current = row.thread_id
    alone = (
        current is not None
        and conn.execute(
            sa.select(sa.func.count()).select_from(messages_t).where(messages_t.c.thread_id == current)
        ).scalar_one()
        == 1
    )
    if target is None and alone:  # the message's own thread simply takes the server's name
        conn.execute(threads_t.update().where(threads_t.c.id == current).values(provider_thread_id=key))
        return
    when = row.sent_at or datetime.now(UTC)
    if target is None:
        target = _create(conn, account_id, key, row.subject, when)
    else:
        _add(conn, target, row.subject, when, count=1)
    conn.execute(messages_t.update().where(messages_t.c.id == message_id).values(thread_id=target))
    if current is not None:
        if alone:
            conn.execute(threads_t.delete().where(threads_t.c.id == current))
        else:
            conn.execute(
                threads_t.update().where(threads_t.c.id == current).values(message_count=threads_t.c.message_count - 1)
            )
