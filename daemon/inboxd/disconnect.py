"""Disconnecting a mailbox: `inboxd disconnect EMAIL [--purge]` and POST /accounts/disconnect.

The refresh token is revoked at the provider where it has an endpoint (Google; Microsoft has none for one token),
the stored credentials are deleted and the account is stopped (running daemons drop it within seconds: they watch
mail_accounts.enabled). Its mail stays for the HR app unless purged: then its messages, threads, attachments (and
their files, unless another row needs them), folders and the account row itself are deleted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import sqlalchemy as sa
import structlog

from inboxd.blobs import BlobStore
from inboxd.config import Config
from inboxd.errors import RetryLater, SecretsError, UsageError
from inboxd.forget import ForgetReport, delete_messages, delete_unused_blobs
from inboxd.models import MailAccount, MailMessage, MailThread
from inboxd.oauth_flow import revoke
from inboxd.store import DISCONNECTED_REASON, OAUTH2_REFRESH, Store

log = structlog.get_logger(__name__)

accounts_t = MailAccount.__table__  # type: ignore[attr-defined]
messages_t = MailMessage.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]


@dataclass
class DisconnectReport:
    email: str
    revocation: str  # "revoked", "already invalid", "no endpoint", "nothing to revoke", "failed: ..."
    outbox_failed: int = 0
    purged: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "email": self.email,
            "revocation": self.revocation,
            "outbox_failed": self.outbox_failed,
            "purged": self.purged or None,
        }


def disconnect(config: Config, store: Store, blobs: BlobStore | None, email: str, *, purge: bool) -> DisconnectReport:
    account = store.account(email)
    if account is None:
        raise UsageError(f"no account {email.strip().lower()} (see `inboxd accounts list`)")
    report = DisconnectReport(account.email, revocation="nothing to revoke")
    provider = config.providers.get(account.provider)
    if store.has_credential(account.id):
        try:
            credential = store.credential(account.id)
        except SecretsError as exc:  # a lost key must not keep the mailbox connected: delete what we cannot read
            report.revocation = f"failed: {exc}"
            credential = None
        if credential is not None and credential.kind == OAUTH2_REFRESH and provider is not None:
            try:
                report.revocation = revoke(provider, credential.secret)
            except RetryLater as exc:
                # the token is deleted here anyway; the person can also remove the app in their account settings
                report.revocation = f"failed: {exc}"
    report.outbox_failed = store.disconnect_account(account.id, DISCONNECTED_REASON)
    if purge:
        report.purged = purge_account(store.engine, blobs, account.id)
    log.info(
        "account.disconnected",
        account=account.email,
        revocation=report.revocation.split(":")[0],
        purged=purge,
        outbox_failed=report.outbox_failed,
    )
    return report


def purge_account(engine: sa.Engine, blobs: BlobStore | None, account_id: int) -> dict[str, int]:
    """Delete the account and everything stored for it, in one transaction; then the attachment files no other
    row needs."""
    report = ForgetReport(address_key="")
    started = time.time()  # the files' clock (see delete_unused_blobs)
    with engine.begin() as conn:
        ids = conn.execute(sa.select(messages_t.c.id).where(messages_t.c.account_id == account_id)).scalars().all()
        delete_messages(conn, ids, report)
        threads = conn.execute(threads_t.delete().where(threads_t.c.account_id == account_id)).rowcount
        # folders, locations, quarantine, outbox rows, backfills, leases and credentials go with the row (CASCADE)
        conn.execute(accounts_t.delete().where(accounts_t.c.id == account_id))
    delete_unused_blobs(engine, blobs, report, unchanged_since=started)
    return {
        "messages": report.messages,
        "participants": report.participants,
        "attachments": report.attachments,
        "threads": threads,
        "attachment_files_deleted": report.blobs_deleted,
    }
