"""mail_messages (account_id, message_id_header) and (account_id, in_reply_to) indexes: the thread lookups

Without them SQLite's planner, lacking statistics, answers `account_id = ? AND message_id_header IN (a, b)` (a
reply's parent) and `account_id = ? AND in_reply_to = ?` (answers that arrived first) by reading every message of
the account through an index that starts with account_id: a first sync became quadratic (docs/performance.md).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_mail_messages_account_message_id", "mail_messages", ["account_id", "message_id_header"], unique=False
    )
    op.create_index(
        "ix_mail_messages_account_in_reply_to", "mail_messages", ["account_id", "in_reply_to"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_mail_messages_account_in_reply_to", table_name="mail_messages")
    op.drop_index("ix_mail_messages_account_message_id", table_name="mail_messages")
