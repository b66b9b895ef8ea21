"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 17:10:09.662155
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import inboxd.models  # UTCDateTime


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('mail_accounts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('hr_user_ref', sa.String(length=255), nullable=True),
    sa.Column('enabled', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('state', sa.String(length=32), server_default='active', nullable=False),
    sa.Column('state_reason', sa.Text(), nullable=True),
    sa.Column('last_sync_at', inboxd.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('retry_at', inboxd.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', inboxd.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', inboxd.models.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("state IN ('active','paused','disabled','needs_reauth','error')", name='ck_mail_accounts_state'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('email')
    )
    with op.batch_alter_table('mail_accounts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mail_accounts_hr_user_ref'), ['hr_user_ref'], unique=False)

    op.create_table('mail_contacts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('hr_contact_ref', sa.String(length=255), nullable=True),
    sa.Column('created_at', inboxd.models.UTCDateTime(timezone=True), server_default=sa.func.current_timestamp(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('email')
    )
    with op.batch_alter_table('mail_contacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mail_contacts_hr_contact_ref'), ['hr_contact_ref'], unique=False)

    op.create_table('inboxd_credentials',
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('secret', sa.LargeBinary(), nullable=False),
    sa.Column('updated_at', inboxd.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['mail_accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('account_id')
    )
    op.create_table('inboxd_folders',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=1024), nullable=False),
    sa.Column('special_use', sa.String(length=32), nullable=True),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=True),
    sa.Column('last_uid', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('uidnext', sa.BigInteger(), nullable=True),
    sa.Column('highest_modseq', sa.BigInteger(), nullable=True),
    sa.Column('message_count', sa.BigInteger(), nullable=True),
    sa.Column('synced_at', inboxd.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['mail_accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'name', name='uq_inboxd_folders_account_name')
    )
    with op.batch_alter_table('inboxd_folders', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inboxd_folders_account_id'), ['account_id'], unique=False)

    op.create_table('mail_quarantine',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('folder', sa.String(length=1024), nullable=False),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=True),
    sa.Column('uid', sa.BigInteger(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('raw', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', inboxd.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['mail_accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'folder', 'uidvalidity', 'uid', name='uq_mail_quarantine_location')
    )
    with op.batch_alter_table('mail_quarantine', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mail_quarantine_account_id'), ['account_id'], unique=False)

    op.create_table('mail_threads',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('provider_thread_id', sa.String(length=1024), nullable=False),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('first_message_at', inboxd.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_message_at', inboxd.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('message_count', sa.Integer(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['mail_accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'provider_thread_id', name='uq_mail_threads_account_thread')
    )
    with op.batch_alter_table('mail_threads', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mail_threads_account_id'), ['account_id'], unique=False)

    op.create_table('mail_messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('provider_message_id', sa.String(length=1024), nullable=False),
    sa.Column('message_id_header', sa.String(length=1024), nullable=True),
    sa.Column('in_reply_to', sa.String(length=1024), nullable=True),
    sa.Column('references', sa.JSON(), nullable=True),
    sa.Column('thread_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('subject', sa.Text(), nullable=True),
    sa.Column('from_email', sa.String(length=320), nullable=True),
    sa.Column('from_name', sa.Text(), nullable=True),
    sa.Column('sent_at', inboxd.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('received_at', inboxd.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('direction', sa.String(length=16), nullable=False),
    sa.Column('snippet', sa.Text(), nullable=True),
    sa.Column('body_text', sa.Text(), nullable=True),
    sa.Column('body_html', sa.Text(), nullable=True),
    sa.Column('is_read', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=True),
    sa.Column('has_attachments', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('deleted_at', inboxd.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', inboxd.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', inboxd.models.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("direction IN ('inbound','outbound')", name='ck_mail_messages_direction'),
    sa.ForeignKeyConstraint(['account_id'], ['mail_accounts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['thread_id'], ['mail_threads.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'provider_message_id', name='uq_mail_messages_account_provider_id')
    )
    with op.batch_alter_table('mail_messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mail_messages_from_email'), ['from_email'], unique=False)
        batch_op.create_index(batch_op.f('ix_mail_messages_in_reply_to'), ['in_reply_to'], unique=False)
        batch_op.create_index(batch_op.f('ix_mail_messages_message_id_header'), ['message_id_header'], unique=False)
        batch_op.create_index(batch_op.f('ix_mail_messages_received_at'), ['received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_mail_messages_thread_id'), ['thread_id'], unique=False)

    op.create_table('inboxd_locations',
    sa.Column('folder_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('uid', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('flags', sa.JSON(), nullable=True),
    sa.Column('modseq', sa.BigInteger(), nullable=True),
    sa.Column('labels', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['folder_id'], ['inboxd_folders.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['message_id'], ['mail_messages.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('folder_id', 'uid')
    )
    with op.batch_alter_table('inboxd_locations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inboxd_locations_message_id'), ['message_id'], unique=False)

    op.create_table('mail_attachments',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('filename', sa.Text(), nullable=True),
    sa.Column('content_type', sa.String(length=255), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('content_id', sa.String(length=1024), nullable=True),
    sa.Column('is_inline', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('stored', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['mail_messages.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('mail_attachments', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mail_attachments_message_id'), ['message_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_mail_attachments_sha256'), ['sha256'], unique=False)

    op.create_table('mail_participants',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('name', sa.Text(), nullable=True),
    sa.CheckConstraint("role IN ('from','to','cc','bcc','reply_to')", name='ck_mail_participants_role'),
    sa.ForeignKeyConstraint(['message_id'], ['mail_messages.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('mail_participants', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mail_participants_email'), ['email'], unique=False)
        batch_op.create_index(batch_op.f('ix_mail_participants_message_id'), ['message_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('mail_participants', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mail_participants_message_id'))
        batch_op.drop_index(batch_op.f('ix_mail_participants_email'))

    op.drop_table('mail_participants')
    with op.batch_alter_table('mail_attachments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mail_attachments_sha256'))
        batch_op.drop_index(batch_op.f('ix_mail_attachments_message_id'))

    op.drop_table('mail_attachments')
    with op.batch_alter_table('inboxd_locations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inboxd_locations_message_id'))

    op.drop_table('inboxd_locations')
    with op.batch_alter_table('mail_messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mail_messages_thread_id'))
        batch_op.drop_index(batch_op.f('ix_mail_messages_received_at'))
        batch_op.drop_index(batch_op.f('ix_mail_messages_message_id_header'))
        batch_op.drop_index(batch_op.f('ix_mail_messages_from_email'))
        batch_op.drop_index(batch_op.f('ix_mail_messages_in_reply_to'))

    op.drop_table('mail_messages')
    with op.batch_alter_table('mail_threads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mail_threads_account_id'))

    op.drop_table('mail_threads')
    with op.batch_alter_table('mail_quarantine', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mail_quarantine_account_id'))

    op.drop_table('mail_quarantine')
    with op.batch_alter_table('inboxd_folders', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inboxd_folders_account_id'))

    op.drop_table('inboxd_folders')
    op.drop_table('inboxd_credentials')
    with op.batch_alter_table('mail_contacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mail_contacts_hr_contact_ref'))

    op.drop_table('mail_contacts')
    with op.batch_alter_table('mail_accounts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mail_accounts_hr_user_ref'))

    op.drop_table('mail_accounts')
