"""mail_messages (account_id, message_id_header) index: a reply's parent lookup by its references

Without it SQLite's planner, lacking statistics, answers `account_id = ? AND message_id_header IN (a, b)` by
reading every message of the account through the (account_id, provider_message_id) unique index: a first sync
became quadratic (docs/performance.md).

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


def downgrade() -> None:
    op.drop_index("ix_mail_messages_account_message_id", table_name="mail_messages")
