"""Conversation threads for servers without X-GM-THRID: References / In-Reply-To, merged when replies arrive first.

A thread is keyed by its root Message-ID (first References id, else In-Reply-To, else the message's own id).
A batch of messages is threaded in three steps: ``load_threads`` reads everything the batch's decisions need in a
few queries (threads by key, the stored messages its references name, the stored replies to its messages, the
threads a reference-less reply could join by subject); ``ThreadPlan.assign`` decides in memory, message by message
in arrival order, exactly as storing them one at a time would; ``write_threads`` creates, updates and merges the
thread rows in a few statements. A batch of one is the single-message case (a message sent from the outbox).
Subjects are compared in Python, never with SQL's lower() (SQLite lowercases ASCII only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from inboxd.bulk import among, chunks, insert_returning_ids
from inboxd.models import MailAccount, MailMessage, MailParticipant, MailThread
from inboxd.parse import ParsedMessage
from inboxd.scope import normalize_address

accounts_t = MailAccount.__table__  # type: ignore[attr-defined]
messages_t = MailMessage.__table__  # type: ignore[attr-defined]
participants_t = MailParticipant.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]


def thread_root(p: ParsedMessage) -> str | None:
    return (p.references[0] if p.references else None) or p.in_reply_to or p.message_id_header


REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|vs|tr|antw|rif)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
SUBJECT_WINDOW = timedelta(days=60)


def base_subject(subject: str | None) -> tuple[str, bool]:
    """("lowercased subject without Re:/Fwd:/AW: prefixes", whether it had one)."""
    text = " ".join((subject or "").split())
    stripped = REPLY_PREFIX.sub("", text)
    return stripped.lower(), stripped != text


def people(p: ParsedMessage) -> frozenset[str]:
    """The message's participants (scope.normalize_address), for the subject fallback's shared-participant rule."""
    return frozenset(normalize_address(x.email) for x in p.participants)


def _subject_fallback(p: ParsedMessage) -> str | None:
    """The base subject a message may join a thread by (_by_subject): a reply (Re:, AW: ...) with no References and
    no In-Reply-To at all; None otherwise."""
    if p.references or p.in_reply_to:
        return None
    base, is_reply = base_subject(p.subject)
    return base if is_reply and base else None


@dataclass(frozen=True, slots=True)
class ThreadInput:
    """What threading needs of a message about to be inserted."""

    parsed: ParsedMessage
    identity: str
    key: str | None = None  # the server's conversation id (Gmail X-GM-THRID): used as is


@dataclass(eq=False, slots=True)
class ThreadState:
    """One thread row as the batch sees it; ``id`` is None until write_threads inserts a new one."""

    id: int | None
    key: str
    subject: str | None
    first_message_at: datetime | None
    last_message_at: datetime | None
    message_count: int
    order: tuple[int, int]  # (0, id) stored, (1, n) the batch's n-th new thread: the order merges take
    new: bool = False
    changed: bool = False
    merged_into: ThreadState | None = None
    # participants of its messages, as far as the subject fallback needs them (ThreadPlan.track_people)
    people: set[str] = field(default_factory=set)

    def add(self, subject: str | None, when: datetime, *, count: int, last: datetime | None = None) -> None:
        self.message_count += count
        self.first_message_at = min(self.first_message_at or when, when)
        self.last_message_at = max(self.last_message_at or when, last or when)
        self.subject = self.subject or subject
        self.changed = True


@dataclass(slots=True)
class ThreadPlan:
    """Pure: the threads of one batch, decided in memory from what load_threads read.

    ``by_id``: the stored threads read (by key, by the messages below, by subject); ``refs``: Message-ID -> the
    thread of the first stored message with that id; ``answers``: In-Reply-To -> the threads of stored messages
    answering it. The batch's own threads and messages are added as they are assigned.
    ``track_people``: set when the batch has a message that may be threaded by subject; each thread then carries
    the participants it has among those of such messages (read for the stored threads, added as messages are
    assigned). ``own`` is the account's address, which every thread shares and so proves nothing.
    """

    now: datetime
    track_people: bool = False
    own: str = ""
    by_key: dict[str, ThreadState] = field(default_factory=dict)
    by_id: dict[int, ThreadState] = field(default_factory=dict)
    refs: dict[str, ThreadState] = field(default_factory=dict)
    answers: dict[str, list[ThreadState]] = field(default_factory=dict)
    created: list[ThreadState] = field(default_factory=list)
    merged: list[ThreadState] = field(default_factory=list)  # stored threads folded into another

    def assign(self, message: ThreadInput) -> ThreadState:
        """The thread of the next message of the batch; creates, joins or merges threads as needed.

        Without a server key, order of arrival does not matter: a reply stored before its parent starts a thread,
        and when the parent arrives, threads whose messages answer it are merged into the parent's. Only a reply
        with no references at all is grouped by its subject."""
        p = message.parsed
        when = p.sent_at or self.now
        if message.key is not None:
            found = self._live(self.by_key.get(message.key))
            if found is None:
                return self._remember(p, self._create(message.key, p.subject, when))
            found.add(p.subject, when, count=1)
            return self._remember(p, found)
        root = thread_root(p)
        refs = list(dict.fromkeys(r for r in (*p.references, p.in_reply_to) if r))  # In-Reply-To repeats a reference
        thread = self._live(self.by_key.get(root)) if root else None
        if thread is None:
            thread = next((t for r in refs if (t := self.resolve(self.refs.get(r))) is not None), None)
        if thread is None and (base := _subject_fallback(p)) is not None:
            thread = self._by_subject(base, people(p) - {self.own}, when)
        if thread is None and root is None:  # left by an earlier copy of this very message, if any
            thread = self._live(self.by_key.get(f"single:{message.identity}"))
        if thread is None:
            thread = self._create(root or f"single:{message.identity}", p.subject, when)
        else:
            thread.add(p.subject, when, count=1)
        if p.message_id_header:
            self._merge_answers(thread, p.message_id_header)
        return self._remember(p, thread)

    def resolve(self, thread: ThreadState | None) -> ThreadState | None:
        """The thread a (possibly merged-away) thread lives on in."""
        while thread is not None and thread.merged_into is not None:
            thread = thread.merged_into
        return thread

    def thread_id(self, thread: ThreadState) -> int:
        """The row id of the thread ``thread`` lives on in (after write_threads)."""
        live = self.resolve(thread)
        if live is None or live.id is None:
            raise RuntimeError(f"thread {thread.key!r} has no row: write_threads has not run")
        return live.id

    def _live(self, thread: ThreadState | None) -> ThreadState | None:
        return thread if thread is not None and thread.merged_into is None else None

    def _remember(self, p: ParsedMessage, thread: ThreadState) -> ThreadState:
        if self.track_people:
            thread.people |= people(p)
        if p.message_id_header:
            self.refs.setdefault(p.message_id_header, thread)  # a stored message with that id was first
        if p.in_reply_to:
            self.answers.setdefault(p.in_reply_to, []).append(thread)
        return thread

    def _create(self, key: str, subject: str | None, when: datetime) -> ThreadState:
        thread = ThreadState(None, key, subject, when, when, 1, order=(1, len(self.created)), new=True)
        self.created.append(thread)
        self.by_key[key] = thread
        return thread

    def _by_subject(self, base: str, participants: frozenset[str], when: datetime) -> ThreadState | None:
        """Last resort for a reply that carries no References/In-Reply-To (some clients drop them): the most recent
        thread of the account with the same subject without "Re:"-style prefixes (base_subject), active within
        SUBJECT_WINDOW, that has one of the message's ``participants`` (the account's own address left out):
        candidate B's "AW: Bewerbung" must not land in candidate A's thread "Bewerbung"."""
        if not participants:
            return None
        candidates = [
            t
            for t in (*self.by_id.values(), *self.created)
            if t.merged_into is None
            and t.subject is not None
            and t.last_message_at is not None
            and t.last_message_at >= when - SUBJECT_WINDOW
            and not participants.isdisjoint(t.people)
            and base_subject(t.subject)[0] == base
        ]
        return max(candidates, key=lambda t: (t.last_message_at, t.order), default=None)

    def _merge_answers(self, thread: ThreadState, message_id_header: str) -> None:
        """Fold into ``thread`` the threads of messages that answer this one (they arrived first)."""
        others = {self.resolve(t) for t in self.answers.get(message_id_header, ())} - {thread, None}
        for other in sorted((t for t in others if t is not None), key=lambda t: t.order):
            thread.add(
                other.subject,
                other.first_message_at or self.now,
                count=other.message_count,
                last=other.last_message_at,
            )
            thread.people |= other.people  # its messages are the thread's now
            other.merged_into = thread
            if not other.new:
                self.merged.append(other)


def load_threads(conn: sa.Connection, account_id: int, messages: Sequence[ThreadInput], now: datetime) -> ThreadPlan:
    """Read what threading ``messages`` needs, in a few queries per batch."""
    plan = ThreadPlan(now)
    keys: set[str] = set()
    refs: set[str] = set()
    headers: set[str] = set()
    by_subject: set[str] = set()  # the participants of the messages that may be threaded by subject
    earliest = now
    for m in messages:
        p = m.parsed
        if m.key is not None:
            keys.add(m.key)
            continue
        root = thread_root(p)
        keys.update(k for k in (root, f"single:{m.identity}") if k)
        refs.update(r for r in (*p.references, p.in_reply_to) if r)
        if p.message_id_header:
            headers.add(p.message_id_header)
        if _subject_fallback(p) is not None:
            by_subject |= people(p)
            earliest = min(earliest, p.sent_at or now)
    mine = threads_t.c.account_id == account_id
    for among_keys in among(conn, threads_t.c.provider_thread_id, sorted(keys)):
        _keep(plan, conn.execute(sa.select(*_COLUMNS).where(mine, among_keys)).all())
    # (Message-ID, thread) of the stored messages the batch references; (In-Reply-To, thread) of those answering it
    ref_rows = _threads_of(conn, account_id, messages_t.c.message_id_header, refs)
    answer_rows = _threads_of(conn, account_id, messages_t.c.in_reply_to, headers)
    wanted = sorted({t for _, t in (*ref_rows, *answer_rows)} - set(plan.by_id))
    for among_ids in among(conn, threads_t.c.id, wanted):
        _keep(plan, conn.execute(sa.select(*_COLUMNS).where(mine, among_ids)).all())
    for header, thread_id in ref_rows:
        plan.refs.setdefault(header, plan.by_id[thread_id])
    for in_reply_to, thread_id in answer_rows:
        plan.answers.setdefault(in_reply_to, []).append(plan.by_id[thread_id])
    if by_subject:
        _load_people(conn, account_id, plan, by_subject, earliest - SUBJECT_WINDOW)
    return plan


_COLUMNS = (
    threads_t.c.id,
    threads_t.c.provider_thread_id,
    threads_t.c.subject,
    threads_t.c.first_message_at,
    threads_t.c.last_message_at,
    threads_t.c.message_count,
)


def _keep(plan: ThreadPlan, rows: Iterable[Any]) -> None:
    """Add the stored threads of ``rows`` (``_COLUMNS``) to the plan, unless it has them."""
    for row in rows:
        if row.id in plan.by_id:
            continue
        thread = ThreadState(
            row.id,
            row.provider_thread_id,
            row.subject,
            row.first_message_at,
            row.last_message_at,
            row.message_count,
            order=(0, row.id),
        )
        plan.by_id[row.id] = thread
        plan.by_key[thread.key] = thread


def _load_people(conn: sa.Connection, account_id: int, plan: ThreadPlan, wanted: set[str], since: datetime) -> None:
    """For the subject fallback: read the account's threads active since ``since`` that share a participant among
    ``wanted`` (the account's own address left out), then which of ``wanted`` every thread the plan holds has.
    The subjects are compared in Python (ThreadPlan._by_subject): SQL's lower() is ASCII-only on SQLite."""
    plan.track_people = True
    own = conn.execute(sa.select(accounts_t.c.email).where(accounts_t.c.id == account_id)).scalar()
    plan.own = normalize_address(own or "")
    keys = sorted(wanted - {plan.own})
    mail = participants_t.join(messages_t, messages_t.c.id == participants_t.c.message_id)
    found: set[int] = set()
    for among_keys in among(conn, participants_t.c.address_key, keys):
        found.update(
            conn.execute(
                sa.select(messages_t.c.thread_id)
                .distinct()
                .select_from(mail.join(threads_t, threads_t.c.id == messages_t.c.thread_id))
                .where(messages_t.c.account_id == account_id, among_keys, threads_t.c.last_message_at >= since)
            ).scalars()
        )
    mine = threads_t.c.account_id == account_id
    for among_ids in among(conn, threads_t.c.id, sorted(found - set(plan.by_id))):
        _keep(plan, conn.execute(sa.select(*_COLUMNS).where(mine, among_ids)).all())
    # every thread the batch may join, also those read by key or reference (a message of the batch may bring one
    # into the window)
    for among_ids in among(conn, messages_t.c.thread_id, sorted(plan.by_id)):
        for among_keys in among(conn, participants_t.c.address_key, keys):
            rows = conn.execute(
                sa.select(messages_t.c.thread_id, participants_t.c.address_key)
                .distinct()
                .select_from(mail)
                .where(among_ids, among_keys)
            )
            for thread_id, key in rows:
                plan.by_id[thread_id].people.add(key)


def _threads_of(
    conn: sa.Connection, account_id: int, column: sa.Column[Any], values: set[str]
) -> list[tuple[str, int]]:
    """(value, thread id) of the account's threaded messages whose ``column`` is one of ``values``, oldest first."""
    rows: list[tuple[str, int]] = []
    for among_values in among(conn, column, sorted(values)):
        rows += conn.execute(
            sa.select(column, messages_t.c.thread_id)
            .where(messages_t.c.account_id == account_id, among_values, messages_t.c.thread_id.is_not(None))
            .order_by(messages_t.c.id)
        ).all()
    return rows


def write_threads(conn: sa.Connection, account_id: int, plan: ThreadPlan) -> None:
    """Carry out the plan: delete the stored threads merged into another (first: a new thread may take the key of
    one), create the new threads (setting their ids), update the stored ones it changed, then move the messages of
    the merged threads to the threads they were merged into."""
    moved: list[tuple[int, ThreadState]] = []  # (message id, the merged thread it was on)
    merged = {t.id: t for t in plan.merged if t.id is not None}
    for chunk in chunks(sorted(merged)):
        rows = conn.execute(sa.select(messages_t.c.id, messages_t.c.thread_id).where(messages_t.c.thread_id.in_(chunk)))
        moved += [(row.id, merged[row.thread_id]) for row in rows]
        conn.execute(threads_t.delete().where(threads_t.c.id.in_(chunk)))
    created = [t for t in plan.created if t.merged_into is None]
    if created:
        ids = insert_returning_ids(
            conn,
            threads_t,
            [
                {
                    "account_id": account_id,
                    "provider_thread_id": t.key,
                    "subject": t.subject,
                    "first_message_at": t.first_message_at,
                    "last_message_at": t.last_message_at,
                    "message_count": t.message_count,
                }
                for t in created
            ],
        )
        for thread, thread_id in zip(created, ids, strict=True):
            thread.id = thread_id
    changed = [t for t in plan.by_id.values() if t.changed and t.merged_into is None]
    if changed:
        conn.execute(
            threads_t.update()
            .where(threads_t.c.id == sa.bindparam("b_id"))
            .values(
                subject=sa.bindparam("b_subject"),
                first_message_at=sa.bindparam("b_first"),
                last_message_at=sa.bindparam("b_last"),
                message_count=sa.bindparam("b_count"),
            ),
            [
                {
                    "b_id": t.id,
                    "b_subject": t.subject,
                    "b_first": t.first_message_at,
                    "b_last": t.last_message_at,
                    "b_count": t.message_count,
                }
                for t in changed
            ],
        )
    targets: dict[int, list[int]] = {}
    for message_id, thread in moved:
        targets.setdefault(plan.thread_id(thread), []).append(message_id)
    for target, message_ids in sorted(targets.items()):
        for chunk in chunks(sorted(message_ids)):
            conn.execute(messages_t.update().where(messages_t.c.id.in_(chunk)).values(thread_id=target))


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
