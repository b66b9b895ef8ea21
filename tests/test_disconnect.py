"""`inboxd disconnect` through the CLI against the loopback mail stack, on SQLite and PostgreSQL: the refresh token
is revoked at the provider (or the outcome says why not), the credentials are deleted, the account stops and its
queued outbox rows fail, its mail stays unless --purge (then every row and attachment file of it goes, other
accounts untouched); reconnecting resumes syncing; rotated secrets keep decrypting."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from harness import MailStack, make_message
from harness.config import write_stack_config
from harness.messages import Attachment
from inboxd import db
from inboxd.blobs import BlobStore
from test_cli import (
    Cli,
    add_account,
    deliver,
)
from test_contacts import age_files

pytestmark = pytest.mark.mailstack


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def configure(cli: Cli, tmp_path: Path, db_url: str, stack: MailStack, *, revoke_uri: str | None) -> None:
    """Provider `local` of the stack (generic IMAP, XOAUTH2) with ``revoke_uri`` if given; key created."""
    extra = f'revoke_uri = "{revoke_uri}"' if revoke_uri else ""
    cli.config = write_stack_config(tmp_path, db_url, stack, extra=extra)
    assert cli("secrets", "init").code == 0


@pytest.fixture
def revoking_cli(cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack) -> Cli:
    """A CLI whose provider revokes at the shared OAuth server's /revoke, as Google's does."""
    configure(cli, tmp_path, db_url, mailstack, revoke_uri=f"{mailstack.oauth_url}/revoke")
    return cli


def one_value(db_url: str, sql: str, **params: Any) -> Any:
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()
    finally:
        engine.dispose()


def account_row(db_url: str, email: str) -> Any:
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT id, enabled, state, state_reason FROM mail_accounts WHERE email = :e"), {"e": email}
            ).one_or_none()
    finally:
        engine.dispose()


def counts(db_url: str, account_id: int) -> dict[str, int]:
    """Rows stored for one account, by table."""
    where = {
        "mail_messages": "account_id = :a",
        "mail_threads": "account_id = :a",
        "mail_attachments": "message_id IN (SELECT id FROM mail_messages WHERE account_id = :a)",
        "inboxd_credentials": "account_id = :a",
    }
    return {t: one_value(db_url, f"SELECT count(*) FROM {t} WHERE {w}", a=account_id) for t, w in where.items()}


def queue_outbox(db_url: str, account_id: int, key: str) -> None:
    engine = db.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    'INSERT INTO mail_outbox (account_id, "to", subject, body_text, idempotency_key) '
                    "VALUES (:a, :to, 'Interview', 'Thursday?', :k)"
                ),
                {"a": account_id, "to": json.dumps(["cand@example.org"]), "k": key},
            )
    finally:
        engine.dispose()


def refresh_refused(stack: MailStack, refresh_token: str) -> bool:
    """True when the OAuth server answers invalid_grant to this refresh token (revoked)."""
    with requests.Session() as http:
        http.trust_env = False  # loopback: no proxy from the environment
        answer = http.post(
            stack.token_uri,
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": stack.client_id,
                "client_secret": stack.client_secret,
            },
            timeout=10,
        )
    if answer.status_code == 200:
        return False
    assert answer.json()["error"] == "invalid_grant", answer.text
    return True


def deliver_with(stack: MailStack, to: str, subject: str, *attachments: Attachment) -> None:
    stack.deliver(to, make_message("Cand <cand@example.org>", to, subject, "CV attached", attachments=attachments))


def line_of(out: str, email: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(email))


def test_disconnect_revokes_deletes_credentials_keeps_mail_and_fails_queued_outbox(
    revoking_cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """`disconnect USER` revokes the refresh token at the provider (it is refused from then on), deletes the stored
    credentials, disables the account, keeps its message and attachment, fails its queued outbox row as
    disconnected; the next `run --once` skips it as disabled (no token request), holds a row queued after the
    disconnect as disconnected (not as disabled by the HR app), and exits 0."""
    cli = revoking_cli
    user = mailstack.new_user("disc")
    token = add_account(cli, mailstack, tmp_path, user)
    deliver_with(mailstack, user, "application", ("cv.pdf", "application/pdf", b"%PDF-1.4 " + uuid.uuid4().bytes))
    assert cli("run", "--once").code == 0
    account = account_row(db_url, user)
    queue_outbox(db_url, account.id, f"k-{uuid.uuid4().hex}")

    result = cli("disconnect", user)
    assert result.code == 0, result
    assert "credentials deleted" in result.out
    assert "provider revocation: revoked" in result.out
    assert "1 queued outbox message(s) failed" in result.out
    assert refresh_refused(mailstack, token)
    assert counts(db_url, account.id) == {
        "mail_messages": 1,
        "mail_threads": 1,
        "mail_attachments": 1,
        "inboxd_credentials": 0,
    }
    after = account_row(db_url, user)
    assert (bool(after.enabled), after.state) == (False, "disabled")
    assert "disconnected" in after.state_reason
    assert one_value(db_url, "SELECT status FROM mail_outbox WHERE account_id = :a", a=account.id) == "failed"
    assert "disconnected" in one_value(db_url, "SELECT last_error FROM mail_outbox WHERE account_id = :a", a=account.id)

    calls = mailstack.token_calls(token)
    queue_outbox(db_url, account.id, f"after-{uuid.uuid4().hex}")  # the HR app did not notice the disconnect
    again = cli("run", "--once")
    assert again.code == 0, again
    assert "disabled" in line_of(again.out, user)
    assert "disconnected" in line_of(again.out, user)
    assert mailstack.token_calls(token) == calls, "a disconnected account asks for no token"
    late = one_value(
        db_url, "SELECT status || ' / ' || last_error FROM mail_outbox WHERE idempotency_key LIKE 'after-%'"
    )
    assert late == "queued / held: the mailbox was disconnected; connect it again to send", (
        "not 'disabled by the HR app'"
    )
    cli.assert_never_printed(token)


def test_purge_deletes_the_account_and_its_mail_and_files_only(
    revoking_cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--purge` without --yes on a non-terminal stdin exits 2 and changes nothing, even if stdin says "y"; an
    unknown account exits 2. `disconnect USER --purge --yes` deletes the account row, its messages, threads and
    attachment rows, and the attachment file only that account used; another account's mail, attachments and the
    file both share are untouched."""
    cli = revoking_cli
    gone, kept = mailstack.new_user("gone"), mailstack.new_user("kept")
    shared: Attachment = ("offer.pdf", "application/pdf", b"%PDF shared " + uuid.uuid4().bytes)
    own: Attachment = ("cv.pdf", "application/pdf", b"%PDF own " + uuid.uuid4().bytes)
    for email in (gone, kept):
        add_account(cli, mailstack, tmp_path, email)
    deliver_with(mailstack, gone, "application", own, shared)
    deliver_with(mailstack, kept, "offer", shared)
    assert cli("run", "--once").code == 0
    gone_id, kept_id = account_row(db_url, gone).id, account_row(db_url, kept).id
    blobs = BlobStore(tmp_path / "state" / "attachments")
    own_file, shared_file = (blobs.path(hashlib.sha256(a[2]).hexdigest()) for a in (own, shared))
    assert own_file.is_file() and shared_file.is_file()
    age_files(blobs.root)  # stored an hour ago: a file written just before a purge is left to the daily collection
    before = {gone_id: counts(db_url, gone_id), kept_id: counts(db_url, kept_id)}
    assert before[gone_id] == {"mail_messages": 1, "mail_threads": 1, "mail_attachments": 2, "inboxd_credentials": 1}

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    unconfirmed = cli("disconnect", gone, "--purge")
    assert unconfirmed.code == 2, unconfirmed
    assert "--yes" in unconfirmed.err
    unknown = cli("disconnect", "nobody@example.test", "--purge", "--yes")
    assert unknown.code == 2, unknown
    assert "no account nobody@example.test" in unknown.err
    assert {gone_id: counts(db_url, gone_id), kept_id: counts(db_url, kept_id)} == before
    assert bool(account_row(db_url, gone).enabled)

    purged = cli("disconnect", gone, "--purge", "--yes")
    assert purged.code == 0, purged
    assert "purged:" in purged.out and "1 messages" in purged.out
    assert account_row(db_url, gone) is None
    assert counts(db_url, gone_id) == dict.fromkeys(before[gone_id], 0)
    for table in ("mail_messages", "mail_threads", "mail_attachments"):  # no orphans left behind either
        assert one_value(db_url, f"SELECT count(*) FROM {table}") == before[kept_id][table], table
    assert not own_file.exists()
    assert shared_file.is_file(), "the other account's attachment still needs the file"
    assert counts(db_url, kept_id) == before[kept_id]
    assert bool(account_row(db_url, kept).enabled)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("endpoint", ["none", "closed port"])
def test_credentials_are_deleted_when_the_provider_cannot_revoke(
    endpoint: str, cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """No revoke_uri (generic IMAP has none by default) prints "no endpoint"; an unreachable one prints "failed:
    cannot reach ..."; either way the credentials are deleted and the account stops (the token itself stays valid
    at the provider: nothing claims it was revoked)."""
    port = closed_port()
    revoke_uri = None if endpoint == "none" else f"http://127.0.0.1:{port}/revoke"
    configure(cli, tmp_path, db_url, mailstack, revoke_uri=revoke_uri)
    user = mailstack.new_user("norevoke")
    token = add_account(cli, mailstack, tmp_path, user)
    account_id = account_row(db_url, user).id

    result = cli("disconnect", user)
    assert result.code == 0, result
    expected = "no endpoint" if endpoint == "none" else "failed: cannot reach 127.0.0.1"
    assert f"provider revocation: {expected}" in result.out
    assert counts(db_url, account_id)["inboxd_credentials"] == 0
    assert not bool(account_row(db_url, user).enabled)
    assert not refresh_refused(mailstack, token)
    cli.assert_never_printed(token)


def test_a_provider_gone_from_the_config_is_reported_as_not_revoked(
    revoking_cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """The account's provider was renamed or removed in the config: the token cannot be revoked, and the report says
    so and that the grant is still live at the provider (it said "nothing to revoke"); the credentials go anyway."""
    cli = revoking_cli
    user = mailstack.new_user("noprov")
    token = add_account(cli, mailstack, tmp_path, user)
    account_id = account_row(db_url, user).id
    assert cli.config is not None
    cli.config.write_text(cli.config.read_text().replace("[providers.local]", "[providers.renamed]"))

    result = cli("disconnect", user)
    assert result.code == 0, result
    assert (
        "provider revocation: not revoked: provider 'local' is not in the config; the grant stays valid at the "
        "provider" in result.out
    )
    assert counts(db_url, account_id)["inboxd_credentials"] == 0
    assert not refresh_refused(mailstack, token)
    cli.assert_never_printed(token)


def test_purge_works_without_the_key_file(revoking_cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack) -> None:
    """The key file is lost: `disconnect --purge --yes` (a GDPR erasure) still deletes the account and its mail; it
    exited 2 on the missing key before. The token cannot be read, so it is not revoked, and the report says so."""
    cli = revoking_cli
    user = mailstack.new_user("nokey")
    token = add_account(cli, mailstack, tmp_path, user)
    deliver(mailstack, user, "application")
    assert cli("run", "--once").code == 0
    account_id = account_row(db_url, user).id
    key_file = tmp_path / "secret.key"
    key_file.rename(tmp_path / "lost.key")

    result = cli("disconnect", user, "--purge", "--yes")
    assert result.code == 0, result
    assert f"provider revocation: not revoked: without the secrets key ({key_file})" in result.out
    assert "purged:" in result.out and "1 messages" in result.out
    assert account_row(db_url, user) is None
    assert set(counts(db_url, account_id).values()) == {0}
    assert not refresh_refused(mailstack, token)
    # the commands that store credentials still refuse to run without it
    token_file = tmp_path / "other.token"
    token_file.write_text("refresh-token-value\n")
    add = cli("accounts", "add", "other@example.test", "--provider", "local", "--refresh-token-file", str(token_file))
    assert add.code == 2, add
    assert f"key file {key_file} not found" in add.err
    cli.assert_never_printed(token)


def test_reconnect_after_disconnect_resumes_syncing(
    revoking_cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """`accounts add` with a fresh refresh token after a disconnect enables the account again (state active), and
    `run --once` syncs the mail delivered while it was disconnected, next to the mail kept from before."""
    cli = revoking_cli
    user = mailstack.new_user("back")
    add_account(cli, mailstack, tmp_path, user)
    deliver(mailstack, user, "before")
    assert cli("run", "--once").code == 0
    assert cli("disconnect", user).code == 0
    deliver(mailstack, user, "while away")
    assert "disabled" in line_of(cli("run", "--once").out, user)

    fresh = add_account(cli, mailstack, tmp_path, user)
    account = account_row(db_url, user)
    assert (bool(account.enabled), account.state, account.state_reason) == (True, "active", None)
    result = cli("run", "--once")
    assert result.code == 0, result
    assert "1 new" in line_of(result.out, user)
    assert one_value(db_url, "SELECT count(*) FROM mail_messages WHERE account_id = :a", a=account.id) == 2
    cli.assert_never_printed(fresh)


def key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_rotated_and_pruned_secrets_still_decrypt_the_credentials(
    revoking_cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """`secrets rotate` re-encrypts the stored refresh token under a new key and `run --once` still syncs with it;
    `secrets prune` then leaves only that new key, and the credentials still decrypt (the next run syncs too)."""
    cli = revoking_cli
    user = mailstack.new_user("rekey")
    token = add_account(cli, mailstack, tmp_path, user)
    key_file = tmp_path / "secret.key"
    [old_key] = key_lines(key_file)

    rotated = cli("secrets", "rotate")
    assert rotated.code == 0, rotated
    assert "re-encrypted 1 of 1 stored credentials" in rotated.out
    new_key, old = key_lines(key_file)
    assert old == old_key
    deliver(mailstack, user, "after rotate")
    synced = cli("run", "--once")
    assert synced.code == 0, synced
    assert "1 new" in line_of(synced.out, user)

    pruned = cli("secrets", "prune")
    assert pruned.code == 0, pruned
    assert "removed 1 old key" in pruned.out
    assert key_lines(key_file) == [new_key]
    deliver(mailstack, user, "after prune")
    again = cli("run", "--once")
    assert again.code == 0, again
    assert "1 new" in line_of(again.out, user)
    cli.assert_never_printed(token)
    for key in (old_key, new_key):
        cli.assert_never_printed(key)
