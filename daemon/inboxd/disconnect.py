"""Disconnecting a mailbox: `inboxd disconnect EMAIL [--purge]` and POST /accounts/disconnect.

The refresh token is revoked at the provider where it has an endpoint (Google; Microsoft has none for one token),
the stored credentials are deleted (also when they cannot be revoked: the report says why and that the grant is
still live) and the account is stopped (running daemons drop it within seconds: they watch
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
from inboxd.store import DISCONNECTED_REASON, OAUTH2_REFRESH, Account, Store

log = structlog.get_logger(__name__)

accounts_t = MailAccount.__table__  # type: ignore[attr-defined]
messages_t = MailMessage.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]


@dataclass
class DisconnectReport:
    email: str
    # "revoked", "already invalid", "no endpoint", "nothing to revoke", "failed: ..." (tried), "not revoked: ..."
    revocation: str
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
    report = DisconnectReport(account.email, revocation=_revoke(config, store, account))
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


def _revoke(config: Config, store: Store, account: Account) -> str:
    """Revoke the account's refresh token at its provider; what became of it. The credentials are deleted whatever
    this says: a lost key or a provider gone from the config must not keep a mailbox connected (nor stop a purge)."""
    if store.credential_kind(account.id) != OAUTH2_REFRESH:
        return "nothing to revoke"  # no credentials, a password, or a delegated grant (the admin's to withdraw)
    still_live = "the grant stays valid at the provider until the person removes inboxd's access in their account"
    provider = config.providers.get(account.provider)
    if provider is None:
        return f"not revoked: provider {account.provider!r} is not in the config; {still_live}"
    try:
        credential = store.credential(account.id)
    except UsageError:
        return (
            f"not revoked: without the secrets key ({config.secrets.key_file}) the refresh token cannot be read; "
            f"{still_live}"
        )
    except SecretsError as exc:
        return f"not revoked: {exc}; {still_live}"
    try:
        return revoke(provider, credential.secret)
    except RetryLater as exc:
        # the person can also remove the app in their account settings
        return f"failed: {exc}"


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
