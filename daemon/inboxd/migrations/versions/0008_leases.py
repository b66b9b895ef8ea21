"""inboxd_nodes and inboxd_leases: several inboxd nodes on one database

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import inboxd.models  # UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inboxd_nodes",
        sa.Column("node_id", sa.String(length=255), nullable=False),
        sa.Column("heartbeat_at", inboxd.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("node_id"),
    )
    op.create_table(
        "inboxd_leases",
        sa.Column("account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("node_id", sa.String(length=255), nullable=False),
        sa.Column("expires_at", inboxd.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["mail_accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("account_id"),
    )
    with op.batch_alter_table("inboxd_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_inboxd_leases_node_id"), ["node_id"], unique=False)


def downgrade() -> None:
    op.drop_table("inboxd_leases")
    op.drop_table("inboxd_nodes")
