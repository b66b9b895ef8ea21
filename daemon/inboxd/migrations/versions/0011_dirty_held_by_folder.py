"""inboxd_dirty.held_by_folder_id: marks a folder's unfinished re-map holds back from the recompute

A UIDVALIDITY change drops the folder's locations and marks their messages dirty; until the folder's re-map is
finished (it may be refused, interrupted or cut off in between), those marks wait: recomputed earlier, every message
not re-mapped yet looked deleted. A plain ADD COLUMN (no table rebuild on SQLite).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "inboxd_dirty",
        sa.Column("held_by_folder_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
    )


def downgrade() -> None:
    with op.batch_alter_table("inboxd_dirty") as batch:
        batch.drop_column("held_by_folder_id")
