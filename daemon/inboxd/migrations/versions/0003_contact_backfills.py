"""contact backfills

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 17:58:10.548623
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import inboxd.models  # UTCDateTime


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inboxd_backfills',
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('done_at', inboxd.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['mail_accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('account_id', 'email')
    )


def downgrade() -> None:
    op.drop_table('inboxd_backfills')
