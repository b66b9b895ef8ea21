"""participant address keys and the mail_contact_messages view

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 18:02:51.049836

mail_participants.address_key is scope.normalize_address(email), written by inboxd; existing rows are filled here
with the same rule in SQL. The view matches a contact's key, computed in SQL from mail_contacts.email (which the HR
app writes), against that indexed column.

SQLite: a later migration that rebuilds (batch-alters) mail_contacts, mail_participants, mail_messages,
mail_accounts, mail_threads or mail_attachments must drop this view first and create it again afterwards, because
SQLite refuses to rename a table under a view that names it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def address_key_sql(column: str, dialect: str) -> str:
    """scope.normalize_address in SQL: lowercase; on gmail.com/googlemail.com no dots or +tag, domain gmail.com."""
    e = f"lower(trim({column}))"
    if dialect == "postgresql":
        local = f"split_part({e}, '@', 1)"
        return (
            f"CASE WHEN split_part({e}, '@', 2) IN ('gmail.com', 'googlemail.com') "
            f"THEN replace(split_part({local}, '+', 1), '.', '') || '@gmail.com' ELSE {e} END"
        )
    at = f"instr({e}, '@')"
    local = f"CASE WHEN instr({e}, '+') BETWEEN 1 AND {at} THEN substr({e}, 1, instr({e}, '+') - 1) ELSE substr({e}, 1, {at} - 1) END"
    return (
        f"CASE WHEN {at} > 0 AND substr({e}, {at} + 1) IN ('gmail.com', 'googlemail.com') "
        f"THEN replace({local}, '.', '') || '@gmail.com' ELSE {e} END"
    )


def view_sql(dialect: str) -> str:
    # One row per (contact, message): of a message's participants with the contact's key (from and cc, say), only
    # the first one (lowest id) yields a row. Both lookups are served by ix_mail_participants_address_key.
    return f"""
CREATE VIEW mail_contact_messages AS
SELECT c.id AS contact_id,
       c.hr_contact_ref AS hr_contact_ref,
       c.email AS contact_email,
       m.id AS message_id,
       m.account_id AS account_id,
       a.email AS account_email,
       a.hr_user_ref AS hr_user_ref,
       m.thread_id AS thread_id,
       t.provider_thread_id AS provider_thread_id,
       m.subject AS subject,
       m.from_email AS from_email,
       m.from_name AS from_name,
       m.direction AS direction,
       m.sent_at AS sent_at,
       m.received_at AS received_at,
       m.snippet AS snippet,
       m.is_read AS is_read,
       m.has_attachments AS has_attachments,
       (SELECT COUNT(*) FROM mail_attachments x WHERE x.message_id = m.id AND NOT x.is_inline) AS attachment_count,
       m.labels AS labels,
       m.deleted_at AS deleted_at
FROM mail_contacts c
JOIN mail_participants p ON p.address_key = {address_key_sql('c.email', dialect)}
JOIN mail_messages m ON m.id = p.message_id
JOIN mail_accounts a ON a.id = m.account_id
LEFT JOIN mail_threads t ON t.id = m.thread_id
WHERE NOT EXISTS (
    SELECT 1 FROM mail_participants q
    WHERE q.address_key = p.address_key AND q.message_id = p.message_id AND q.id < p.id
)
"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table('mail_participants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('address_key', sa.String(length=320), nullable=True))
    op.execute(f"UPDATE mail_participants SET address_key = {address_key_sql('email', dialect)}")
    with op.batch_alter_table('mail_participants', schema=None) as batch_op:
        batch_op.alter_column('address_key', existing_type=sa.String(length=320), nullable=False)
        batch_op.create_index('ix_mail_participants_address_key', ['address_key', 'message_id'], unique=False)
    op.execute(view_sql(dialect))


def downgrade() -> None:
    op.execute("DROP VIEW mail_contact_messages")
    with op.batch_alter_table('mail_participants', schema=None) as batch_op:
        batch_op.drop_index('ix_mail_participants_address_key')
        batch_op.drop_column('address_key')
