"""The loopback mail stack as seen by tests: endpoints, users, tokens, delivery and server-side mailbox surgery.

Owns talking to tests/mailstack/ (start.sh, the OAuth server's admin API, doveadm); tests never hard-code ports.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import smtplib
import subprocess
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imapclient import IMAPClient

from harness.waiting import wait_for

MAILSTACK_DIR = Path(__file__).resolve().parent.parent / "mailstack"

# IMAP capability variants over the same mailboxes: host to connect to (ports are the same on each)
IMAP_VARIANTS = {
    "full": "127.0.0.1",  # CONDSTORE + QRESYNC (Dovecot's built-in list)
    "no_qresync": "127.0.0.2",  # CONDSTORE advertised, QRESYNC hidden
    "no_condstore": "127.0.0.3",  # neither advertised, like Microsoft 365
}


@dataclass(frozen=True)
class MailStack:
    """Endpoints and admin operations of a running stack (see tests/mailstack/README.md)."""

    root: Path
    host: str = "127.0.0.1"
    imap_port: int = 11143
    imaps_port: int = 11993
    lmtp_port: int = 11024
    submission_port: int = 11587
    smtp_port: int = 11025
    oauth_port: int = 11080
    client_id: str = "inboxd-test-client"
    client_secret: str = field(default="inboxd-test-secret", repr=False)  # never in a failure report

    @classmethod
    def start(cls) -> MailStack:
        """Run tests/mailstack/start.sh (returns at once when the stack is already up and current)."""
        root = Path(os.environ.get("MAILSTACK_ROOT", "/tmp/inboxd-mailstack"))
        proc = subprocess.run(
            [str(MAILSTACK_DIR / "start.sh")],
            env={**os.environ, "MAILSTACK_ROOT": str(root)},
            capture_output=True,
            text=True,
            timeout=600,  # a fresh machine installs Dovecot and Postfix first
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mailstack start failed:\n{proc.stdout}\n{proc.stderr}")
        return cls(root=root)

    # --- endpoints -----------------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        """Self-signed certificate (SAN localhost, 127.0.0.1-3) used by IMAPS, STARTTLS and submission."""
        return self.root / "tls" / "cert.pem"

    @property
    def oauth_url(self) -> str:
        return f"http://127.0.0.1:{self.oauth_port}"

    @property
    def token_uri(self) -> str:
        return f"{self.oauth_url}/token"

    @property
    def doveadm_conf(self) -> Path:
        return self.root / "dovecot.conf"

    def imap_host(self, variant: str = "full") -> str:
        """Host for an IMAP capability variant: "full", "no_qresync" or "no_condstore"."""
        return IMAP_VARIANTS[variant]

    # --- users and tokens ----------------------------------------------------------------
    def new_user(self, prefix: str = "u") -> str:
        """A fresh, empty mailbox address (any address @example.test exists on first use)."""
        user = f"{prefix}-{uuid.uuid4().hex[:12]}@example.test"
        # Dovecot writes the wire log of the variant listeners here, but does not create the directory
        rawlog = self.root / "rawlog" / user
        rawlog.mkdir(parents=True, exist_ok=True)
        mail = pwd.getpwnam("mail")
        os.chown(rawlog, mail.pw_uid, mail.pw_gid)
        return user

    def refresh_token(self, user: str) -> str:
        return str(self._admin_post("/admin/refresh_token", user=user)["refresh_token"])

    def access_token(self, user: str, ttl: int | None = None) -> str:
        """An access token minted directly (no /token call, not counted in token_calls)."""
        form = {"user": user} if ttl is None else {"user": user, "ttl": str(ttl)}
        return str(self._admin_post("/admin/access_token", **form)["access_token"])

    def revoke(self, token: str) -> None:
        """Revoke a refresh token (its access tokens die too) or a single access token."""
        self._admin_post("/admin/revoke", token=token)

    def set_access_ttl(self, seconds: int | None, *, user: str | None = None) -> None:
        """TTL of access tokens minted from now on: for one user (preferred, tests run side by side) or all.

        ``set_access_ttl(None, user=u)`` drops the user's override.
        """
        form = {"access_ttl": "" if seconds is None else str(seconds)}
        if user is not None:
            form["user"] = user
        self._admin_post("/admin/config", **form)

    def token_calls(self, refresh_token: str) -> int:
        """How many access tokens /token granted for this refresh token."""
        query = urllib.parse.urlencode({"refresh_token": refresh_token})
        with urllib.request.urlopen(f"{self.oauth_url}/admin/stats?{query}", timeout=10) as resp:
            return int(json.load(resp)["token_calls"])

    def admin(self, path: str, **form: str) -> dict[str, Any]:
        """POST ``form`` to the shared OAuth server's /admin/<path> (like OAuthServer.admin for private ones)."""
        return self._admin_post(f"/admin/{path.lstrip('/')}", **form)

    def _admin_post(self, path: str, **form: str) -> dict[str, Any]:
        data = urllib.parse.urlencode(form).encode()
        with urllib.request.urlopen(f"{self.oauth_url}{path}", data, timeout=10) as resp:
            result: dict[str, Any] = json.load(resp)
            return result

    # --- mail in and out -----------------------------------------------------------------
    def deliver(self, to: str, raw: bytes, *, mail_from: str = "sender@example.org", wait: bool = True) -> None:
        """Inject ``raw`` as incoming mail over plain SMTP; with ``wait``, return once it is in the INBOX."""
        with smtplib.SMTP(self.host, self.smtp_port, timeout=10) as smtp:
            smtp.sendmail(mail_from, [to], raw)
        match = re.search(rb"^Message-ID:\s*(<[^>\r\n]+>)", raw, re.IGNORECASE | re.MULTILINE)
        if wait and match:
            message_id = match.group(1).decode()
            with self.admin_imap(to) as imap:
                imap.select_folder("INBOX", readonly=True)

                def arrived() -> bool:
                    imap.noop()
                    return bool(imap.search(["HEADER", "Message-ID", message_id]))

                wait_for(arrived, 10, what=f"delivery of {message_id} to {to}")

    def admin_imap(self, user: str, *, variant: str = "full") -> IMAPClient:
        """An IMAPClient logged in as ``user`` (XOAUTH2, plain 11143); use it as a context manager."""
        imap = IMAPClient(self.imap_host(variant), self.imap_port, ssl=False, timeout=30)
        try:
            imap.oauth2_login(user, self.access_token(user))
        except BaseException:
            imap.shutdown()
            raise
        return imap

    def imap_commands(self, user: str) -> list[str]:
        """Commands clients sent as ``user`` on the no_qresync / no_condstore listeners (Dovecot rawlog).

        Dovecot still honours CONDSTORE/QRESYNC there if a client uses them unasked; this log is how a
        test proves the client did not (e.g. no CHANGEDSINCE, no ENABLE QRESYNC).
        """
        commands = []
        for path in sorted((self.root / "rawlog" / user).glob("*.in")):
            for line in path.read_text(errors="replace").splitlines():
                # "<epoch.usec> <tag> <command ...>"; literal continuation lines have no tag
                commands.append(line.split(" ", 2)[-1])
        return commands

    # --- server-side surgery -------------------------------------------------------------
    def doveadm(self, *args: str) -> str:
        proc = subprocess.run(
            ["doveadm", "-c", str(self.doveadm_conf), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def uidvalidity(self, user: str, folder: str = "INBOX") -> int:
        out = self.doveadm("mailbox", "status", "-u", user, "uidvalidity", folder)
        return int(out.strip().split("=", 1)[1])

    def bump_uidvalidity(self, user: str, folder: str = "INBOX", uidvalidity: int | None = None) -> int:
        """Give ``folder`` a new UIDVALIDITY (default: current + 1) and return it.

        Messages keep their UID numbers (the nasty case: same UIDs, new UIDVALIDITY). Dovecot disconnects
        sessions that have the folder selected; new sessions see the new UIDVALIDITY.
        """
        new = uidvalidity if uidvalidity is not None else self.uidvalidity(user, folder) + 1
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(new), folder)
        return new
