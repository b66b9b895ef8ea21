"""Config files for tests that run inboxd against the loopback mail stack.

One writer, so the CLI tests and the sync tests point inboxd at the stack the same way.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.mailstack import MailStack

if TYPE_CHECKING:
    from gmail.server import GmailServer


def write_stack_config(
    directory: Path,
    db_url: str,
    stack: MailStack,
    *,
    host: str = "127.0.0.1",
    extra: str = "",
    scope: str = "all",
    sync_extra: str = "",
) -> Path:
    """Write ``directory/inboxd.toml``: provider ``local`` (generic IMAP over STARTTLS, XOAUTH2 against the stack's
    OAuth server), ``scope`` (default "all"), small batches, key and state under ``directory``; ``extra`` is
    appended verbatim (e.g. ``[accounts."EMAIL"]`` tables). Returns the path."""
    text = f"""
state_dir = "{directory / "state"}"
[database]
url = "{db_url}"
[secrets]
key_file = "{directory / "secret.key"}"
[sync]
scope = "{scope}"
batch_size = 3
{sync_extra}
[providers.local]
kind = "imap"
imap_host = "{host}"
imap_port = {stack.imap_port}
imap_tls = "starttls"
smtp_host = "127.0.0.1"
smtp_port = {stack.submission_port}
smtp_tls = "starttls"
auth = "oauth2"
token_uri = "{stack.token_uri}"
client_id = "{stack.client_id}"
client_secret = "{stack.client_secret}"
ca_file = "{stack.ca_cert}"
timeout = 10
{extra}
"""
    path = directory / "inboxd.toml"
    path.write_text(text)
    return path


def connect_accounts(
    config: Path, stack: MailStack, users: Iterable[str], inboxd: str, *, upgrade: bool = False
) -> dict[str, str]:
    """What an admin does before `inboxd run`: (`db upgrade`,) `secrets init` and `accounts add` of each user with
    provider ``local`` and a fresh refresh token. Returns the environment that points inboxd at ``config``."""
    env = {**os.environ, "INBOXD_CONFIG": str(config)}
    for args in ([["db", "upgrade"]] if upgrade else []) + [["secrets", "init"]]:
        subprocess.run([inboxd, *args], env=env, check=True, capture_output=True)
    for user in users:
        token = config.parent / f"token-{user}"
        token.write_text(stack.refresh_token(user))
        add = ["accounts", "add", user, "--provider", "local", "--refresh-token-file", str(token)]
        subprocess.run([inboxd, *add], env=env, check=True, capture_output=True)
    return env


def write_gmail_config(
    directory: Path, db_url: str, stack: MailStack, server: GmailServer, *, scope: str = "all", sync_extra: str = ""
) -> Path:
    """Write ``directory/inboxd.toml`` with provider ``gmail`` pointed at a Gmail-dialect test server (IMAP and
    SMTP over STARTTLS, XOAUTH2 against the stack's OAuth server). Returns the path."""
    path = directory / "inboxd.toml"
    path.write_text(f"""
state_dir = "{directory / "state"}"
[database]
url = "{db_url}"
[secrets]
key_file = "{directory / "secret.key"}"
[sync]
scope = "{scope}"
batch_size = 3
{sync_extra}
{gmail_provider("gmail", "gmail", stack, server)}""")
    return path


def gmail_provider(name: str, kind: str, stack: MailStack, server: GmailServer, extra: str = "") -> str:
    """A ``[providers.NAME]`` table pointed at a Gmail-dialect test server (IMAP and SMTP over STARTTLS) and the
    stack's OAuth server; ``extra`` lines go inside the table."""
    return f"""
[providers.{name}]
kind = "{kind}"
imap_host = "127.0.0.1"
imap_port = {server.imap_port}
imap_tls = "starttls"
smtp_host = "127.0.0.1"
smtp_port = {server.smtp_port}
smtp_tls = "starttls"
token_uri = "{stack.token_uri}"
client_id = "{stack.client_id}"
client_secret = "{stack.client_secret}"
ca_file = "{stack.ca_cert}"
timeout = 10
{extra}
"""
