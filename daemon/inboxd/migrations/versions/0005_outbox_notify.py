"""outbox insert -> NOTIFY inboxd_outbox (PostgreSQL only), so the sender wakes at once instead of polling

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has no LISTEN/NOTIFY: the sender polls there
    op.execute(
        """
        CREATE OR REPLACE FUNCTION inboxd_outbox_notify() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('inboxd_outbox', NEW.id::text);
            RETURN NEW;
        END
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        "CREATE TRIGGER mail_outbox_notify AFTER INSERT ON mail_outbox "
        "FOR EACH ROW EXECUTE FUNCTION inboxd_outbox_notify()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS mail_outbox_notify ON mail_outbox")
    op.execute("DROP FUNCTION IF EXISTS inboxd_outbox_notify()")
