"""outbox row made due by an UPDATE -> NOTIFY inboxd_outbox (PostgreSQL only)

The sender sleeps until the earliest retry it knows of. A row that someone else makes due now (an admin's
"retry now", `UPDATE mail_outbox SET next_attempt_at = NULL`) wakes it at once through this trigger, as an insert
does through 0005's. inboxd's own updates set a future retry time or another status, so they do not fire it.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has no LISTEN/NOTIFY: the sender sees any commit there (PRAGMA data_version)
    op.execute(
        "CREATE TRIGGER mail_outbox_notify_due AFTER UPDATE OF status, next_attempt_at ON mail_outbox "
        "FOR EACH ROW WHEN (NEW.status = 'queued' AND (NEW.next_attempt_at IS NULL OR NEW.next_attempt_at <= now())) "
        "EXECUTE FUNCTION inboxd_outbox_notify()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS mail_outbox_notify_due ON mail_outbox")
