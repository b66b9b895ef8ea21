"""mail_accounts.import_done / import_total: a mailbox's first sync (its import), message by message

The HR app could count the messages stored so far but not how many there are to import: a recruiter who connects a
mailbox of 40,000 messages saw nothing about how long it would take. Plain ADD COLUMNs (no table rebuild on SQLite).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("mail_accounts", sa.Column("import_done", sa.Integer(), nullable=True))
    op.add_column("mail_accounts", sa.Column("import_total", sa.Integer(), nullable=True))


def downgrade() -> None:
    # plain DROP COLUMN (SQLite 3.35+): a batch rebuild of mail_accounts would fail on the view that names it
    # (mail_contact_messages), and dropping the table with foreign keys on would cascade to every row of the account
    op.drop_column("mail_accounts", "import_total")
    op.drop_column("mail_accounts", "import_done")
