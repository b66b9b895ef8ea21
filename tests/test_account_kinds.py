"""Every way to connect a mailbox without the consent flow, through the `inboxd` CLI end to end, on SQLite and
PostgreSQL: a password on generic IMAP (Dovecot, Postfix submission), Google Workspace domain-wide delegation (a
service-account key, JWT-bearer grant at the shared OAuth server, the Gmail-dialect server) and Microsoft 365 app-only
(client-credentials grant; the test IMAP server lets an app-only token open any mailbox, as Exchange Online does)."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from imapclient import IMAPClient

from gmail.server import GmailServer
from harness import MailStack, make_message, wait_for
from harness.config import gmail_provider
from harness.oauth import make_service_account
from inboxd import db
from inboxd.delegation import APP_ONLY_GRANTS
from test_cli import (
    Cli,
    by_email,
)

pytestmark = pytest.mark.mailstack

ADMIN_USER, ADMIN_PASSWORD = "admin@example.test", "adminpass"  # tests/mailstack/users.passwd


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def write_config(directory: Path, db_url: str, providers: str) -> Path:
    """``directory/inboxd.toml`` with the given ``[providers.*]`` tables; key and state under ``directory``."""
    path = directory / "inboxd.toml"
    path.write_text(f"""
state_dir = "{directory / "state"}"
[database]
url = "{db_url}"
[secrets]
key_file = "{directory / "secret.key"}"
[sync]
scope = "all"
batch_size = 50
{providers}
""")
    return path


def rows(db_url: str, sql: str, **params: Any) -> list[Any]:
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def subjects(db_url: str, email: str) -> set[str]:
    found = rows(
        db_url,
        "SELECT m.subject FROM mail_messages m JOIN mail_accounts a ON a.id = m.account_id WHERE a.email = :e",
        e=email,
    )
    return {r.subject for r in found}


def emails(cli: Cli) -> set[str]:
    return {a["email"] for a in cli.json("accounts", "list")}


# --- a password on generic IMAP --------------------------------------------------------------------------------


def admin_imap(stack: MailStack) -> IMAPClient:
    imap = IMAPClient(stack.host, stack.imap_port, ssl=False, timeout=30)
    imap.login(ADMIN_USER, ADMIN_PASSWORD)
    return imap


@pytest.fixture
def admin_mailbox(mailstack: MailStack) -> Iterator[str]:
    """A unique subject tag; afterwards every message carrying it leaves admin@example.test's INBOX and Sent (the
    mailbox is shared by every test run and would otherwise grow with each one)."""
    tag = f"pw-{uuid.uuid4().hex[:12]}"
    yield tag
    with admin_imap(mailstack) as imap:
        for folder in ("INBOX", "Sent"):
            imap.select_folder(folder)
            uids = imap.search(["SUBJECT", tag])
            if uids:
                imap.delete_messages(uids)
                imap.expunge()


def test_password_account_syncs_sends_and_a_wrong_password_needs_reauth(
    db_url: str, tmp_path: Path, cli: Cli, mailstack: MailStack, admin_mailbox: str
) -> None:
    """`accounts add --password-file` on a kind "imap" provider (auth password by default): `run --once` logs in
    with LOGIN over STARTTLS, stores the delivered message and sends a queued outbox row through Postfix submission
    (AUTH PLAIN). A wrong password makes the next run exit 1 with the account needs_reauth, and no output, reason or
    error column shows either password."""
    cli.config = write_config(
        tmp_path,
        db_url,
        f"""
[providers.pw]
kind = "imap"
imap_host = "127.0.0.1"
imap_port = {mailstack.imap_port}
imap_tls = "starttls"
smtp_host = "127.0.0.1"
smtp_port = {mailstack.submission_port}
smtp_tls = "starttls"
ca_file = "{mailstack.ca_cert}"
timeout = 10
""",
    )
    assert cli("secrets", "init").code == 0
    inbound, outbound = f"{admin_mailbox} inbound", f"{admin_mailbox} outbound"
    mailstack.deliver(ADMIN_USER, make_message("Cand <cand@example.org>", ADMIN_USER, inbound, "hello"))
    password_file = tmp_path / "password"
    password_file.write_text(ADMIN_PASSWORD + "\n")
    added = cli("accounts", "add", ADMIN_USER, "--provider", "pw", "--password-file", str(password_file))
    assert added.code == 0, added

    candidate = mailstack.new_user("cand")
    [account] = rows(db_url, "SELECT id FROM mail_accounts WHERE email = :e", e=ADMIN_USER)
    engine = db.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    'INSERT INTO mail_outbox (account_id, "to", subject, body_text, idempotency_key) '
                    "VALUES (:a, :to, :s, 'Thanks for applying.', :k)"
                ),
                {"a": account.id, "to": json.dumps([candidate]), "s": outbound, "k": admin_mailbox},
            )
    finally:
        engine.dispose()

    synced = cli("run", "--once")
    assert synced.code == 0, synced
    assert "outbox: 1 sent" in synced.out
    assert inbound in subjects(db_url, ADMIN_USER)
    [row] = rows(db_url, "SELECT status, last_error FROM mail_outbox WHERE idempotency_key = :k", k=admin_mailbox)
    assert (row.status, row.last_error) == ("sent", None)

    def delivered() -> bool:
        with mailstack.admin_imap(candidate) as imap:
            imap.select_folder("INBOX", readonly=True)
            return bool(imap.search(["SUBJECT", outbound]))

    wait_for(delivered, 10, what="the outbox message in the candidate's INBOX")

    wrong = "wrong-" + secrets.token_hex(8)
    password_file.write_text(wrong + "\n")
    replaced = cli("accounts", "add", ADMIN_USER, "--provider", "pw", "--password-file", str(password_file))
    assert replaced.code == 0, replaced
    failed = cli("run", "--once")
    assert failed.code == 1, failed
    status = by_email(cli.json("status"))[ADMIN_USER]
    assert status["state"] == "needs_reauth", status
    assert status["state_reason"]
    for secret in (wrong, ADMIN_PASSWORD):
        assert secret not in status["state_reason"]
        assert secret not in (status["last_error"] or "")
        cli.assert_never_printed(secret)


# --- Google Workspace domain-wide delegation -------------------------------------------------------------------


def shared_service_account(stack: MailStack, path: Path, *, domains: str) -> tuple[Path, str]:
    """A service account registered at the SHARED OAuth server (the Gmail-dialect server checks tokens there) under
    a unique client_email; returns the key file and its PEM private key."""
    client_email = f"inboxd-{uuid.uuid4().hex[:8]}@hr-project.iam.gserviceaccount.com"
    key_file = make_service_account(stack, client_email=client_email, domains=domains, path=path)
    return key_file, str(json.loads(key_file.read_text())["private_key"])


def test_workspace_delegation_connects_and_syncs_without_consent(
    db_url: str, tmp_path: Path, cli: Cli, mailstack: MailStack, gmail_server: GmailServer
) -> None:
    """A kind "gmail" provider with service_account_file: `accounts add --delegated` fetches a token for the user
    first and stores the account; `run --once` syncs the Gmail mailbox with delegated tokens. A user outside the
    delegated domain is refused at `accounts add` with what the Workspace admin must grant, and nothing is stored;
    with --no-verify it is stored and the run marks it `error` with that reason; once the admin grants that domain,
    the next run syncs it, with no `accounts add` again (no one could reconnect it: it used to be parked
    needs_reauth for good). A provider without service_account_file refuses --delegated with exit 2. The private
    key is never printed."""
    key_file, pem = shared_service_account(mailstack, tmp_path / "sa.json", domains="example.test")
    cli.config = write_config(
        tmp_path,
        db_url,
        gmail_provider("gmail", "gmail", mailstack, gmail_server, f'service_account_file = "{key_file}"')
        + gmail_provider("gmail_consent", "gmail", mailstack, gmail_server),
    )
    assert cli("secrets", "init").code == 0
    user = f"dwd-{uuid.uuid4().hex[:12]}@example.test"
    subject = f"delegated {uuid.uuid4().hex[:8]}"
    gmail_server.deliver(make_message("Cand <cand@example.org>", user, subject, "hello"))

    added = cli("accounts", "add", user, "--provider", "gmail", "--delegated")
    assert added.code == 0, added
    synced = cli("run", "--once")
    assert synced.code == 0, synced
    assert "1 new" in next(line for line in synced.out.splitlines() if line.startswith(user))
    assert subjects(db_url, user) == {subject}

    outsider = "other@elsewhere.test"
    refused = cli("accounts", "add", outsider, "--provider", "gmail", "--delegated")
    assert refused.code != 0, refused
    assert "domain-wide delegation is not granted" in refused.err
    assert outsider in refused.err
    assert outsider not in emails(cli)

    unverified = cli("accounts", "add", outsider, "--provider", "gmail", "--delegated", "--no-verify")
    assert unverified.code == 0, unverified
    refused_run = cli("run", "--once")
    assert refused_run.code == 1, refused_run
    status = by_email(cli.json("status"))
    assert status[outsider]["state"] == "error"
    assert "domain-wide delegation is not granted" in status[outsider]["state_reason"]
    assert status[user]["state"] == "active"

    # the Workspace admin grants the other domain too (a new key in the same file, as a key rotation does)
    client_email = json.loads(key_file.read_text())["client_email"]
    make_service_account(mailstack, client_email=client_email, domains="example.test,elsewhere.test", path=key_file)
    new_pem = str(json.loads(key_file.read_text())["private_key"])
    gmail_server.deliver(make_message("Cand <cand@example.org>", outsider, subject, "hello"))
    resumed = cli("run", "--once")
    assert resumed.code == 0, resumed
    assert by_email(cli.json("status"))[outsider]["state"] == "active"
    assert subjects(db_url, outsider) == {subject}

    consent_only = cli("accounts", "add", f"x-{user}", "--provider", "gmail_consent", "--delegated")
    assert consent_only.code == 2, consent_only
    assert "service_account_file" in consent_only.err and "app_only" in consent_only.err
    assert f"x-{user}" not in emails(cli)

    for line in [*pem.splitlines()[1:-1], *new_pem.splitlines()[1:-1]]:
        cli.assert_never_printed(line)


# --- Microsoft 365 app-only ------------------------------------------------------------------------------------


def set_app_only(stack: MailStack, enabled: bool) -> None:
    with requests.Session() as http:
        http.trust_env = False
        answer = http.post(f"{stack.oauth_url}/admin/config", data={"app_only": str(int(enabled))}, timeout=10)
    answer.raise_for_status()


def test_microsoft_app_only_connects_and_syncs_without_consent(
    db_url: str, tmp_path: Path, cli: Cli, mailstack: MailStack, gmail_server: GmailServer
) -> None:
    """A kind "microsoft" provider with app_only = true: `accounts add --delegated` gets a client-credentials token
    and stores the account; `run --once` opens the user's mailbox with that app-only token and syncs it. When the
    tenant has no service principal for the app (AADSTS7000229), `accounts add --delegated` fails with the grants a
    Microsoft 365 admin must make, stores nothing, and never shows the client secret."""
    cli.config = write_config(
        tmp_path, db_url, gmail_provider("m365", "microsoft", mailstack, gmail_server, "app_only = true")
    )
    assert cli("secrets", "init").code == 0
    user = f"app-{uuid.uuid4().hex[:12]}@example.test"
    subject = f"app-only {uuid.uuid4().hex[:8]}"
    gmail_server.deliver(make_message("Cand <cand@example.org>", user, subject, "hello"))

    added = cli("accounts", "add", user, "--provider", "m365", "--delegated")
    assert added.code == 0, added
    synced = cli("run", "--once")
    assert synced.code == 0, synced
    assert subject in subjects(db_url, user)

    other = f"app-{uuid.uuid4().hex[:12]}@example.test"
    set_app_only(mailstack, False)  # the SHARED server: other tests use it, so restore at once
    try:
        refused = cli("accounts", "add", other, "--provider", "m365", "--delegated")
    finally:
        set_app_only(mailstack, True)
    assert refused.code != 0, refused
    assert "AADSTS7000229" in refused.err
    assert APP_ONLY_GRANTS in refused.err
    assert other not in emails(cli)
    cli.assert_never_printed(mailstack.client_secret)
