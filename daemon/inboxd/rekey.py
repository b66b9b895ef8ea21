"""Key rotation for stored credentials: re-encrypt every inboxd_credentials row under the key file's newest key,
check that no row needs an old key any more, and the `inboxd secrets rotate` / `prune` commands built on them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from inboxd.config import Config
from inboxd.crypto import SecretBox, add_key, prune_keys
from inboxd.errors import SecretsError
from inboxd.models import MailAccount, MailCredential

accounts_t = MailAccount.__table__  # type: ignore[attr-defined]
creds_t = MailCredential.__table__  # type: ignore[attr-defined]

# Rows held in memory at once; the whole re-encryption is still one transaction.
CHUNK_ROWS = 200


@dataclass(frozen=True, slots=True)
class RekeyReport:
    rotated: int  # rows re-encrypted with the first key
    total: int  # rows seen; total - rotated were under the first key already


def reencrypt_credentials(engine: sa.Engine, box: SecretBox, *, chunk_rows: int = CHUNK_ROWS) -> RekeyReport:
    """Re-encrypt every stored credential with ``box``'s first key, in one transaction: all rows or none.

    A row no key of ``box`` decrypts raises SecretsError naming its account, and nothing is written.
    """
    primary = box.primary_only()
    rotated = total = 0
    with engine.begin() as conn:
        for rows in _credential_chunks(conn, chunk_rows, lock=True):
            for account_id, email, secret in rows:
                total += 1
                if _decrypts(primary, secret):
                    continue  # already under the first key (a second run after an interrupted one)
                _rewrite(conn, box, account_id, email, secret)
                rotated += 1
    return RekeyReport(rotated=rotated, total=total)


def verify_credentials(engine: sa.Engine, box: SecretBox, *, chunk_rows: int = CHUNK_ROWS) -> list[int]:
    """Account ids whose stored credentials ``box`` cannot decrypt (before `prune`: a box of the first key only)."""
    with engine.connect() as conn:
        return [
            account_id
            for rows in _credential_chunks(conn, chunk_rows, lock=False)
            for account_id, _email, secret in rows
            if not _decrypts(box, secret)
        ]


def rotate_command(config: Config, engine: sa.Engine) -> str:
    """`inboxd secrets rotate`: a new key on top of the key file, every credential re-encrypted with it.
    Returns the line to print."""
    path = config.secrets.key_file
    unreadable = verify_credentials(engine, SecretBox.from_key_file(path))
    if unreadable:
        raise SecretsError(
            f"no key in {path} decrypts the credentials of {_accounts(engine, unreadable)}; nothing was changed. "
            "Put the key they were encrypted with back into the key file, or reconnect those accounts"
        )
    add_key(path)
    # A crash from here until reencrypt_credentials commits is safe: the old keys stay in the file, so every row,
    # under the old key or (after the commit) the new one, still decrypts, here and on nodes sharing the file.
    # Running rotate again finishes the job.
    report = reencrypt_credentials(engine, SecretBox.from_key_file(path))
    return (
        f"re-encrypted {report.rotated} of {report.total} stored credentials with a new key, added on top of {path}. "
        f"The old keys stay in {path} so that every key file in use still decrypts the credentials: copy {path} to "
        "every other inboxd node now (until then they cannot decrypt the credentials), then remove the old keys "
        "with `inboxd secrets prune`"
    )


def prune_command(config: Config, engine: sa.Engine) -> str:
    """`inboxd secrets prune`: drop every key but the first, refused while a credential still needs an old one.
    Returns the line to print."""
    path = config.secrets.key_file
    box = SecretBox.from_key_file(path)
    stale = verify_credentials(engine, box.primary_only())
    if stale:
        raise SecretsError(
            f"the credentials of {_accounts(engine, stale)} are still encrypted with an old key in {path}; nothing "
            f"was pruned. Make sure every inboxd node has the current {path}, run `inboxd secrets rotate` again, "
            "then prune"
        )
    removed = prune_keys(path, unchanged_since=box.file_id)
    if removed == 0:
        return f"{path} holds a single key; nothing to prune"
    return (
        f"removed {removed} old key{'s' if removed != 1 else ''} from {path}; every stored credential decrypts with "
        f"the key left. Copy {path} to every other inboxd node"
    )


def _credential_chunks(
    conn: sa.Connection, chunk_rows: int, *, lock: bool
) -> Iterator[Sequence[tuple[int, str, bytes]]]:
    """Every credential row as (account id, account email, ciphertext), ``chunk_rows`` at a time, by account id."""
    after = -1
    while True:
        query = (
            sa.select(creds_t.c.account_id, accounts_t.c.email, creds_t.c.secret)
            .join(accounts_t, accounts_t.c.id == creds_t.c.account_id)
            .where(creds_t.c.account_id > after)
            .order_by(creds_t.c.account_id)
            .limit(chunk_rows)
        )
        if lock and conn.dialect.name == "postgresql":
            # Token refreshes (Store.refresh_slot) lock the same row: they wait for this transaction, never
            # overwrite a re-encrypted row with an older token. mail_accounts stays unlocked.
            query = query.with_for_update(of=creds_t)
        rows = [(int(r.account_id), str(r.email), bytes(r.secret)) for r in conn.execute(query)]
        if not rows:
            return
        yield rows
        after = rows[-1][0]


def _rewrite(conn: sa.Connection, box: SecretBox, account_id: int, email: str, secret: bytes) -> None:
    update = creds_t.update().where(creds_t.c.account_id == account_id)
    # Compare-and-set: on SQLite the first chunk is read before this transaction takes the write lock, so a token
    # refresh may have stored a new secret since; never put the older one back.
    result: Any = conn.execute(
        update.where(creds_t.c.secret == secret).values(secret=_rotate(box, account_id, email, secret))
    )
    if result.rowcount == 1:
        return
    # The row changed (or went: account disconnected) before this transaction's first write; it holds the write
    # lock now, so the row read here stays as read until the commit.
    current = conn.execute(sa.select(creds_t.c.secret).where(creds_t.c.account_id == account_id)).first()
    if current is not None:
        fresh = bytes(current.secret)
        conn.execute(update.values(secret=_rotate(box, account_id, email, fresh)))


def _rotate(box: SecretBox, account_id: int, email: str, secret: bytes) -> bytes:
    try:
        return box.rotate(secret)
    except SecretsError:
        raise SecretsError(
            f"the credentials of account {account_id} ({email}) cannot be decrypted with any key in {box.source}; "
            "nothing was re-encrypted. Put the key they were encrypted with back into the key file, or reconnect "
            "the account"
        ) from None


def _decrypts(box: SecretBox, secret: bytes) -> bool:
    try:
        box.decrypt(secret)
    except SecretsError:
        return False
    return True


def _accounts(engine: sa.Engine, account_ids: Sequence[int]) -> str:
    """'account 3 (a@x.test)' or 'accounts 3 (a@x.test), 7 (b@x.test)', for messages (the first 20)."""
    shown = sorted(account_ids)[:20]
    with engine.connect() as conn:
        rows = conn.execute(sa.select(accounts_t.c.id, accounts_t.c.email).where(accounts_t.c.id.in_(shown)))
        emails = {int(row.id): str(row.email) for row in rows}
    names = ", ".join(f"{i} ({emails.get(i, '?')})" for i in shown)
    more = f" and {len(account_ids) - len(shown)} more" if len(account_ids) > len(shown) else ""
    noun = "account" if len(account_ids) == 1 else "accounts"
    return f"{noun} {names}{more}"
