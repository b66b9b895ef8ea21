"""The outbox's SQL: claim a row atomically (FOR UPDATE SKIP LOCKED on PostgreSQL, one writer at a time on SQLite),
fix its Message-ID before the first attempt, and record each attempt's outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from inboxd.clock import Clock
from inboxd.models import MailOutbox
from inboxd.outbox_policy import RetryPolicy, RowUpdate

outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    account_id: int
    to: Any
    cc: Any
    bcc: Any
    subject: str
    body_text: str | None
    body_html: str | None
    reply_to_message_id: int | None
    attachments: Any
    idempotency_key: str
    attempts: int
    message_id_header: str | None
    last_error: str | None
    delivery_uncertain: bool = False
    claimed_at: datetime | None = None  # this attempt's claim: updates only apply while it is still ours
    created_at: datetime | None = None
    # columns the HR app wrote that cannot be read ("to: not valid JSON"): the row fails with this, alone
    unreadable: str | None = None


def _row(r: Any, unreadable: str | None = None) -> OutboxRow:
    return OutboxRow(
        id=r.id,
        account_id=r.account_id,
        to=r.to,
        cc=r.cc,
        bcc=r.bcc,
        subject=r.subject,
        body_text=r.body_text,
        body_html=r.body_html,
        reply_to_message_id=r.reply_to_message_id,
        attachments=r.attachments,
        idempotency_key=r.idempotency_key,
        attempts=r.attempts,
        message_id_header=r.message_id_header,
        last_error=r.last_error,
        delivery_uncertain=r.delivery_uncertain,
        claimed_at=r.claimed_at,
        created_at=r.created_at,
        unreadable=unreadable,
    )


def _ours(row_id: int, claimed_at: datetime | None) -> Any:
    """WHERE clause of an attempt's own updates: a row reclaimed by another worker (its claim looked stale) has a
    newer claimed_at, and the slower worker's late updates then change nothing."""
    cond = outbox_t.c.id == row_id
    return cond if claimed_at is None else sa.and_(cond, outbox_t.c.claimed_at == claimed_at)


class OutboxStore:
    def __init__(self, engine: sa.Engine, *, clock: Clock, policy: RetryPolicy) -> None:
        self.engine = engine
        self._clock = clock
        self._policy = policy

    def claim_next(self, *, exclude_accounts: frozenset[int] = frozenset()) -> OutboxRow | None:
        """Take the oldest due row (or a 'sending' row abandoned by a crash) and mark it 'sending', atomically.

        Two workers, on one node or several, never get the same row.
        """
        now = self._clock.now()
        retry_at, due_now = self._as_time(outbox_t.c.next_attempt_at, now)
        due = sa.or_(
            sa.and_(
                outbox_t.c.status == "queued",
                sa.or_(outbox_t.c.next_attempt_at.is_(None), retry_at <= due_now),
            ),
            sa.and_(outbox_t.c.status == "sending", outbox_t.c.claimed_at <= now - self._policy.stale_after),
        )
        if self.engine.dialect.name == "sqlite":
            # SQLite keeps any text in a timestamp column: a queued row whose next_attempt_at is no time would
            # never come due, silently; it is taken now and fails naming the column (see _load)
            due = sa.or_(
                due,
                sa.and_(
                    outbox_t.c.status == "queued",
                    outbox_t.c.next_attempt_at.is_not(None),
                    sa.func.datetime(outbox_t.c.next_attempt_at).is_(None),
                ),
            )
        pick = sa.select(outbox_t.c.id).where(due).order_by(outbox_t.c.id).limit(1)
        if exclude_accounts:
            pick = pick.where(outbox_t.c.account_id.not_in(sorted(exclude_accounts)))
        pick = pick.with_for_update(skip_locked=True)  # PostgreSQL; SQLite serializes writers instead
        stmt = (
            outbox_t.update()
            .where(outbox_t.c.id == pick.scalar_subquery())
            .values(status="sending", claimed_at=now, attempts=outbox_t.c.attempts + 1)
            .returning(outbox_t.c.id)
        )
        with self.engine.begin() as conn:
            row_id = conn.execute(stmt).scalar()
        return self._load(row_id) if row_id is not None else None

    def _as_time(self, column: Any, when: datetime) -> tuple[Any, Any]:
        """``column`` and ``when`` as comparable times. SQLite keeps timestamps as text and compares them as text: the
        HR app's "2026-01-01T11:00:00Z" sorted after inboxd's "2026-01-01 12:00:00.000000" (a "T" after a space), so
        such a row came due only the next day; julianday() reads both forms (and an offset) as the same instant."""
        if self.engine.dialect.name != "sqlite":
            return column, when
        return sa.func.julianday(column), sa.func.julianday(sa.literal(when, column.type))

    def _load(self, row_id: int) -> OutboxRow:
        """A claimed row, read after its claim committed: a value that cannot be read (SQLite keeps any text in a
        JSON or timestamp column) used to raise inside the claim, which rolled back, so the same row came first
        again on every drain and no row of any account was sent. Now the row comes back with the others' values
        and ``unreadable`` naming the bad ones."""
        select = sa.select(outbox_t).where(outbox_t.c.id == row_id)
        with self.engine.connect() as conn:
            try:
                return _row(conn.execute(select).one())
            except (ValueError, TypeError):
                pass
            values: dict[str, Any] = {}
            bad: list[str] = []
            for column in outbox_t.c:
                try:
                    values[column.name] = conn.execute(sa.select(column).where(outbox_t.c.id == row_id)).scalar_one()
                except (ValueError, TypeError) as exc:
                    values[column.name] = None
                    what = "not valid JSON" if isinstance(column.type, sa.JSON) else "not a timestamp"
                    bad.append(f"{column.name}: {what} ({type(exc).__name__})")
        return _row(SimpleNamespace(**values), unreadable="; ".join(bad) or "the row cannot be read")

    def next_due(self) -> datetime | None:
        """When the next row becomes due that is not due now: the earliest retry (`next_attempt_at` of a queued
        row) or a 'sending' claim turning stale. A queued row without a retry time is due at once (now); None when
        no row waits. Lets the sender sleep until then instead of asking every second."""
        with self.engine.connect() as conn:
            try:
                retry, waiting_now, claimed = conn.execute(
                    sa.select(
                        sa.func.min(outbox_t.c.next_attempt_at).filter(outbox_t.c.status == "queued"),
                        sa.func.count()
                        .filter(outbox_t.c.status == "queued", outbox_t.c.next_attempt_at.is_(None))
                        .label("waiting_now"),
                        sa.func.min(outbox_t.c.claimed_at).filter(outbox_t.c.status == "sending"),
                    ).where(outbox_t.c.status.in_(("queued", "sending")))
                ).one()
            except (ValueError, TypeError):  # SQLite: a time that is no time; claim_next takes that row and fails it
                return self._clock.now()
        times = [t for t in (retry, claimed + self._policy.stale_after if claimed else None) if t is not None]
        if waiting_now:
            times.append(self._clock.now())
        return min(times, default=None)

    def fix_message_id(self, row_id: int, message_id: str) -> str:
        """Store the Message-ID before the first attempt; a row that already has one keeps it (retries reuse it).
        An empty string counts as none."""
        with self.engine.begin() as conn:
            conn.execute(
                outbox_t.update()
                .where(
                    outbox_t.c.id == row_id,
                    sa.or_(outbox_t.c.message_id_header.is_(None), outbox_t.c.message_id_header == ""),
                )
                .values(message_id_header=message_id)
            )
            stored: str = conn.execute(
                sa.select(outbox_t.c.message_id_header).where(outbox_t.c.id == row_id)
            ).scalar_one()
        return stored

    def mark_uncertain(self, row_id: int, *, claimed_at: datetime | None = None) -> bool:
        """Committed before the message goes to SMTP: a crash from here on leaves the row marked. False when the
        claim was lost to another worker (then this attempt must not send)."""
        with self.engine.begin() as conn:
            result = conn.execute(outbox_t.update().where(_ours(row_id, claimed_at)).values(delivery_uncertain=True))
        return result.rowcount == 1

    def record(
        self,
        row_id: int,
        update: RowUpdate,
        *,
        sent_message_id: int | None = None,
        note: str | None = None,
        uncertain: bool | None = False,
        claimed_at: datetime | None = None,
    ) -> None:
        """Store an attempt's outcome; `note` replaces last_error on a sent row (e.g. partially refused);
        `uncertain`: the message may have been delivered although the attempt did not end in a 250 (None: keep)."""
        error = note if update.status == "sent" else update.last_error
        values: dict[str, Any] = {
            "status": update.status,
            "next_attempt_at": update.next_attempt_at,
            "last_error": error[:2000] if error else None,
        }
        if update.status in ("sent", "failed"):  # a final row: nothing is left to check (schema.md)
            values["delivery_uncertain"] = False
        elif uncertain is not None:  # None: leave the mark as the interrupted attempt left it
            values["delivery_uncertain"] = uncertain
        if update.status == "sent":
            values["sent_at"] = self._clock.now()
            values["sent_message_id"] = sent_message_id
        with self.engine.begin() as conn:
            conn.execute(
                outbox_t.update()
                .where(
                    _ours(row_id, claimed_at),
                    # an attempt's outcome lands only on a row still being sent: a 'sent' row is never downgraded
                    outbox_t.c.status.in_(("sending", "sent") if update.status == "sent" else ("sending",)),
                )
                .values(**values)
            )

    def hold(self, row_id: int, reason: str, until: datetime, *, claimed_at: datetime | None = None) -> None:
        """Put a claimed row back without counting an attempt (account paused, disabled or not sending today)."""
        with self.engine.begin() as conn:
            conn.execute(
                outbox_t.update()
                .where(_ours(row_id, claimed_at))
                .values(
                    status="queued",
                    attempts=sa.func.greatest(outbox_t.c.attempts - 1, 0)
                    if self.engine.dialect.name == "postgresql"
                    else sa.func.max(outbox_t.c.attempts - 1, 0),
                    next_attempt_at=until,
                    last_error=reason,
                )
            )

    def defer_account(self, account_id: int, until: datetime, reason: str) -> None:
        """Push the queued rows of an account that would come due before ``until`` to it (daily sending limit
        reached); a row the HR app scheduled later keeps its time."""
        column = outbox_t.c.next_attempt_at
        retry_at, deferred_to = self._as_time(column, until)
        with self.engine.begin() as conn:
            conn.execute(
                outbox_t.update()
                .where(
                    outbox_t.c.account_id == account_id,
                    outbox_t.c.status == "queued",
                    sa.or_(column.is_(None), retry_at < deferred_to),
                )
                .values(next_attempt_at=until, last_error=reason)
            )

    def count(self, status: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(outbox_t).where(outbox_t.c.status == status)
                ).scalar_one()
            )

    def depth(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(outbox_t).where(outbox_t.c.status.in_(("queued", "sending")))
                ).scalar_one()
            )
