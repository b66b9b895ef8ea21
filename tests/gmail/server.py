"""GmailServer: the in-process Gmail-dialect IMAP + SMTP server for tests (an asyncio loop on its own thread), with
the admin API tests drive it by (delivery, labels, faults, counters). Also ``cd tests && python -m gmail.server``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email.utils
import json
import re
import signal
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from gmail.faults import Counters, Faults
from gmail.imap import ImapSession
from gmail.model import (
    GMAIL_NAMES,
    GOOGLE_MAIL_DE_NAMES,
    INBOX,
    SEEN,
    SENT,
    SPAM,
    TRASH,
    Account,
    Folder,
    FolderNames,
    Store,
)
from gmail.smtp import SmtpSession

TokenValidator = Callable[[str, str], bool]
DEFAULT_INTROSPECT_URL = "http://127.0.0.1:11080/introspect"


class IntrospectValidator:
    """Checks an access token at an RFC 7662 endpoint (the mail stack's OAuth server, as Dovecot does).

    A user token must be active and name ``user``. An app-only token (introspection says active and
    ``"app_only": true``, no email: the OAuth server's client_credentials grant) opens any mailbox, as Exchange Online
    lets an app holding the full_access_as_app / IMAP.AccessAsApp application permission log in to every mailbox it
    has been granted; that is how the tests use this server as a Microsoft 365 stand-in.
    """

    def __init__(
        self, url: str = DEFAULT_INTROSPECT_URL, client: tuple[str, str] = ("dovecot", "introspect-secret")
    ) -> None:
        self.url = url
        self._authorization = "Basic " + base64.b64encode(":".join(client).encode()).decode()

    def __call__(self, user: str, token: str) -> bool:
        request = urllib.request.Request(
            self.url,
            data=urllib.parse.urlencode({"token": token}).encode(),
            headers={"Authorization": self._authorization},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            info = json.load(resp)
        if not info.get("active"):
            return False
        return info.get("app_only") is True or str(info.get("email", "")).lower() == user.strip().lower()


@dataclass(frozen=True)
class MessageInfo:
    """A snapshot of one message as the admin API reports it."""

    user: str
    gm_msgid: int
    gm_thrid: int
    labels: frozenset[str]
    flags: frozenset[str]
    modseq: int
    raw: bytes
    uids: Mapping[str, int]  # folder name -> UID


@dataclass(frozen=True)
class FolderInfo:
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: tuple[int, ...]


class GmailServer:
    """IMAP (plain + STARTTLS, optional implicit TLS) and SMTP on loopback, random free ports by default.

    ``tls`` is (cert.pem, key.pem); ``validator(user, token) -> bool`` checks XOAUTH2 tokens (default: the mail
    stack's /introspect); ``passwords`` enables LOGIN / AUTH PLAIN for those users. Use as a context manager.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        imap_port: int = 0,
        smtp_port: int = 0,
        imaps_port: int | None = None,
        tls: tuple[Path | str, Path | str] | None = None,
        validator: TokenValidator | None = None,
        passwords: Mapping[str, str] | None = None,
        names: FolderNames = GMAIL_NAMES,
        advertise_compress: bool = False,
        local_domains: Iterable[str] = ("example.test",),
    ) -> None:
        self.host = host
        self.imap_port, self.smtp_port, self.imaps_port = imap_port, smtp_port, imaps_port
        self.tls_context: ssl.SSLContext | None = None
        if tls is not None:
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.load_cert_chain(str(tls[0]), str(tls[1]))
        self.validator = validator or IntrospectValidator()
        self.passwords = {k.lower(): v for k, v in (passwords or {}).items()}
        self.advertise_compress = advertise_compress
        self.local_domains = {d.lower() for d in local_domains}
        self.store = Store(names, self._notify)
        self.faults = Faults()
        self.counters = Counters()
        self._sessions: dict[str, set[ImapSession]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[object]] = set()

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> Self:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, name="gmail-test-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), loop).result(10)
        return self

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    async def _listen(self) -> None:
        limit = 1 << 20
        imap = await asyncio.start_server(self._imap_client, self.host, self.imap_port, limit=limit)
        smtp = await asyncio.start_server(self._smtp_client, self.host, self.smtp_port, limit=limit)
        self._servers = [imap, smtp]
        self.imap_port = imap.sockets[0].getsockname()[1]
        self.smtp_port = smtp.sockets[0].getsockname()[1]
        if self.tls_context is not None and self.imaps_port is not None:
            imaps = await asyncio.start_server(
                lambda r, w: self._imap_client(r, w, tls=True),
                self.host,
                self.imaps_port,
                ssl=self.tls_context,
                limit=limit,
            )
            self._servers.append(imaps)
            self.imaps_port = imaps.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()

    async def _track(self, session: ImapSession | SmtpSession) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await session.run()
        except asyncio.CancelledError:
            # stop() cancels sessions; ending normally keeps 3.11's start_server callback from logging the
            # cancellation as an error (it calls task.exception() on the handler task)
            pass
        finally:
            self._tasks.discard(task)

    async def _imap_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool = False) -> None:
        await self._track(ImapSession(self, reader, writer, tls))

    async def _smtp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._track(SmtpSession(self, reader, writer))

    # --- used by sessions -----------------------------------------------------------------------------------------
    def check_token(self, user: str, token: str) -> bool:
        """Runs on an executor thread: the validator may do HTTP."""
        try:
            return bool(token) and self.validator(user, token)
        except (OSError, ValueError):
            return False

    def session_opened(self, session: ImapSession) -> None:
        assert session.user is not None
        with self.store.lock:
            self._sessions.setdefault(session.user, set()).add(session)

    def session_closed(self, session: ImapSession) -> None:
        if session.user is None:
            return
        with self.store.lock:
            self._sessions.get(session.user, set()).discard(session)
        self.counters.disconnect(session.user)

    def _notify(self, user: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self.store.lock:
            sessions = list(self._sessions.get(user, ()))
        for session in sessions:
            loop.call_soon_threadsafe(session.changed.set)

    def file_sent(self, user: str, raw: bytes, rcpts: Iterable[str]) -> int:
        """What Gmail does with a submitted message: \\Sent (and \\Seen) for the sender, INBOX for local
        recipients; From rewritten to the authenticated user."""
        raw = _with_sender(raw, user)
        rcpts = {r.lower() for r in rcpts}
        with self.store.lock:
            labels = [SENT, INBOX] if user in rcpts else [SENT]
            msg = self.store.account(user).add(raw, labels=labels, flags=[SEEN])
            for rcpt in sorted(rcpts - {user}):
                if self.store.exists(rcpt) or rcpt.rpartition("@")[2] in self.local_domains:
                    self.store.account(rcpt).add(raw, labels=[INBOX])
        self.counters.smtp_message(user, msg.gm_msgid)
        return msg.gm_msgid

    # --- admin API: mail ------------------------------------------------------------------------------------------
    def deliver(
        self,
        raw: bytes,
        labels: Iterable[str] = (INBOX,),
        *,
        user: str | None = None,
        flags: Iterable[str] = (),
        internaldate: datetime | None = None,
    ) -> int:
        """File ``raw`` into ``user``'s mailbox (default: the first To address) with ``labels``; returns the
        X-GM-MSGID. INTERNALDATE defaults to the Date header."""
        if user is None:
            match = re.search(rb"^To:(.*)$", raw, re.IGNORECASE | re.MULTILINE)
            found = email.utils.getaddresses([match.group(1).decode("utf-8", "replace")]) if match else []
            if not found or not found[0][1]:
                raise ValueError("deliver() needs user= when the message has no To address")
            user = found[0][1]
        with self.store.lock:
            return self.store.account(user).add(raw, labels=labels, flags=flags, internaldate=internaldate).gm_msgid

    def _change(self, gm_msgid: int, **changes: Iterable[str]) -> None:
        with self.store.lock:
            account, msg = self.store.find(gm_msgid)
            account.change(msg, **changes)

    def add_labels(self, gm_msgid: int, *labels: str) -> None:
        self._change(gm_msgid, add_labels=labels)

    def remove_labels(self, gm_msgid: int, *labels: str) -> None:
        self._change(gm_msgid, remove_labels=labels)

    def set_flags(self, gm_msgid: int, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        self._change(gm_msgid, add_flags=add, remove_flags=remove)

    def trash(self, gm_msgid: int) -> None:
        """As the web UI's Delete: \\Trash, out of the INBOX; the message leaves All Mail and the label folders."""
        self._change(gm_msgid, add_labels=[TRASH], remove_labels=[INBOX, SPAM])

    def spam(self, gm_msgid: int) -> None:
        self._change(gm_msgid, add_labels=[SPAM], remove_labels=[INBOX, TRASH])

    def delete_forever(self, gm_msgid: int) -> None:
        with self.store.lock:
            account, msg = self.store.find(gm_msgid)
            account.delete_forever(msg)

    def message(self, gm_msgid: int) -> MessageInfo:
        with self.store.lock:
            account, msg = self.store.find(gm_msgid)
            uids = {f.name: f.by_msgid[gm_msgid] for f in account.folders.values() if gm_msgid in f.by_msgid}
            return MessageInfo(
                account.email,
                msg.gm_msgid,
                msg.gm_thrid,
                frozenset(msg.labels),
                frozenset(msg.flags),
                msg.modseq,
                msg.raw,
                uids,
            )

    def account(self, user: str) -> Account:
        """The live model (hold ``server.store.lock`` while touching it)."""
        return self.store.account(user)

    def folder(self, user: str, name_or_special_use: str) -> FolderInfo:
        """A folder by name or by SPECIAL-USE attribute (``"\\\\All"``)."""
        with self.store.lock:
            found = self._folder(user, name_or_special_use)
            return FolderInfo(
                found.name,
                found.special_use,
                found.uidvalidity,
                found.uidnext,
                found.highestmodseq,
                tuple(found.uids),
            )

    def _folder(self, user: str, name_or_special_use: str) -> Folder:
        account = self.store.account(user)
        for folder in account.folders.values():
            if name_or_special_use in (folder.name, folder.special_use) or (
                name_or_special_use.upper() == "INBOX" == folder.name
            ):
                return folder
        raise KeyError(f"{user} has no folder {name_or_special_use!r}")

    def bump_uidvalidity(
        self, user: str, folder: str = "INBOX", *, first_uid: int = 1, uidvalidity: int | None = None
    ) -> int:
        """New UIDVALIDITY for a folder (by name or special use), UIDs renumbered from ``first_uid``; sessions
        that have it selected get ``* BYE`` (their sequence/UID map is void)."""
        with self.store.lock:
            target = self._folder(user, folder)
            new = self.store.account(user).bump_uidvalidity(target, first_uid, uidvalidity)
            sessions = [s for s in self._sessions.get(user.lower(), ()) if s.folder is target]
        for session in sessions:
            self._on_loop(session.bye())
        return new

    def hide_all_mail(self, user: str, hidden: bool = True) -> None:
        """The user unticked "Show in IMAP" for All Mail: not listed, SELECT/STATUS answer NO [NONEXISTENT]."""
        with self.store.lock:
            self.store.account(user).all_mail_hidden = hidden

    # --- admin API: faults ----------------------------------------------------------------------------------------
    def throttle(self, n_commands: int, user: str | None = None) -> None:
        """The next ``n_commands`` tagged OK replies carry [THROTTLED], appended (``A5 OK Success [THROTTLED]``)."""
        self.faults.set_throttle(n_commands, user)

    def overquota(self, user: str | None = None, enabled: bool = True) -> None:
        """Authenticated commands (but LOGOUT) answer NO [OVERQUOTA] until turned off."""
        self.faults.set_flag(self.faults.overquota, user, enabled)

    def bye_after(self, n_commands: int, user: str | None = None) -> None:
        """After ``n_commands`` more completed commands the session gets ``* BYE Session expired...`` and is
        closed (once); 0 = the open sessions right now."""
        if n_commands <= 0:
            self.kick(user)
        else:
            self.faults.set_bye(n_commands, user)

    def kick(self, user: str | None = None) -> None:
        """``* BYE Session expired, please login again.`` to every (or ``user``'s) authenticated session now."""
        with self.store.lock:
            sessions = [s for u, ss in self._sessions.items() if user is None or u == user.lower() for s in ss]
        for session in sessions:
            self._on_loop(session.bye())

    def too_many_connections(self, limit: int | None, user: str | None = None) -> None:
        """Logins beyond ``limit`` concurrent authenticated sessions per user get NO [ALERT] Too many..."""
        self.faults.set_connection_limit(limit, user)

    def imap_disabled(self, user: str, disabled: bool = True) -> None:
        self.faults.set_flag(self.faults.imap_disabled, user, disabled)

    def raw_folder_names(self, user: str | None = None, enabled: bool = True) -> None:
        """LIST sends folder names as raw UTF-8 (``"R&D"``), not modified UTF-7 (``"R&-D"``), as some servers do."""
        self.faults.set_flag(self.faults.raw_folder_names, user, enabled)

    def daily_limit(self, user: str | None = None, enabled: bool = True) -> None:
        """SMTP MAIL FROM answers 550 5.4.5 Daily user sending limit exceeded."""
        self.faults.set_flag(self.faults.daily_limit, user, enabled)

    def drop_after_data(self, times: int = 1) -> None:
        """Close the SMTP connection after the DATA terminator without replying; the message is still filed."""
        self.faults.drop_after_data = times

    def temp_fail(self, times: int = 1) -> None:
        """SMTP MAIL FROM answers ``421 4.7.0 Try again later, closing connection.`` and closes."""
        self.faults.temp_fail = times

    def withhold_body(self, gm_msgid: int, withheld: bool = True) -> None:
        """FETCH replies for this message come without its content (``BODY[]``, ``RFC822``, body parts; header
        fields still come), the other items in them, and the command ends OK: a message the server cannot read at
        the moment."""
        self.faults.withhold_body(gm_msgid, withheld)

    def unfetchable(self, gm_msgid: int, on: bool = True) -> None:
        """A message Gmail cannot serve: a FETCH that names it sends the other messages' replies, none for it, and
        ends ``NO Some messages could not be FETCHed (Failure)``."""
        with self.faults._lock:
            (self.faults.unfetchable.add if on else self.faults.unfetchable.discard)(gm_msgid)

    def login_unavailable(self, times: int = 1) -> None:
        """The next ``times`` logins (AUTHENTICATE, LOGIN) answer ``NO [UNAVAILABLE] Temporary System Problem``."""
        self.faults.login_unavailable = times

    def login_bye(self, times: int = 1) -> None:
        """The next ``times`` logins are answered with ``* BYE`` and a closed connection (a server going down)."""
        self.faults.login_bye = times

    def clear_faults(self) -> None:
        self.faults.clear()

    # --- admin API: counters --------------------------------------------------------------------------------------
    def commands(self, user: str) -> list[str]:
        """IMAP command names (``"UID FETCH"``) the user's authenticated sessions sent, in order."""
        with self.counters._lock:
            return list(self.counters.commands.get(user.lower(), []))

    def body_bytes_sent(self, user: str) -> int:
        """Bytes of BODY[...]/RFC822* data sent to the user (what Gmail's download quota counts)."""
        with self.counters._lock:
            return self.counters.body_bytes.get(user.lower(), 0)

    def connections(self, user: str) -> int:
        """Authenticated IMAP sessions of the user open now."""
        with self.counters._lock:
            return self.counters.connections.get(user.lower(), 0)

    def smtp_sent(self, user: str) -> list[int]:
        """X-GM-MSGIDs of the messages the user submitted over SMTP."""
        with self.counters._lock:
            return list(self.counters.smtp_sent.get(user.lower(), []))

    def _on_loop(self, coro: Coroutine[object, object, None]) -> None:
        loop = self._loop
        if loop is not None:
            asyncio.run_coroutine_threadsafe(coro, loop).result(5)


def _with_sender(raw: bytes, user: str) -> bytes:
    """Gmail rewrites From to the authenticated user (unless it is a verified alias) and fills in a Message-ID."""
    raw = re.sub(rb"\r?\n", b"\r\n", raw)
    end = raw.find(b"\r\n\r\n")
    header, body = (raw, b"") if end < 0 else (raw[: end + 2], raw[end + 2 :])
    match = re.search(rb"^From:(.*(?:\r\n[ \t].*)*)\r\n", header, re.IGNORECASE | re.MULTILINE)
    if match:
        name, address = email.utils.parseaddr(match.group(1).decode("utf-8", "replace"))
        if address.lower() != user:
            replaced = f"From: {email.utils.formataddr((name, user))}\r\n".encode()
            header = header[: match.start()] + replaced + header[match.end() :]
    else:
        header = f"From: {user}\r\n".encode() + header
    if not re.search(rb"^Message-ID:", header, re.IGNORECASE | re.MULTILINE):
        header += f"Message-ID: {email.utils.make_msgid(domain='mail.gmail.com')}\r\n".encode()
    if not re.search(rb"^Date:", header, re.IGNORECASE | re.MULTILINE):
        header += f"Date: {email.utils.formatdate()}\r\n".encode()
    return header + body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gmail.server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="IMAP (plain + STARTTLS); 0 = a free port")
    parser.add_argument("--smtp-port", type=int, default=0)
    parser.add_argument("--imaps-port", type=int, default=None)
    parser.add_argument("--cert", help="PEM certificate (enables STARTTLS), e.g. /tmp/inboxd-mailstack/tls/cert.pem")
    parser.add_argument("--key", help="PEM private key")
    parser.add_argument("--introspect-url", default=DEFAULT_INTROSPECT_URL)
    parser.add_argument("--password", action="append", default=[], metavar="USER=PASS", help="LOGIN users")
    parser.add_argument("--names", choices=["gmail", "de"], default="gmail", help="system folder names")
    args = parser.parse_args(argv)
    server = GmailServer(
        host=args.host,
        imap_port=args.port,
        smtp_port=args.smtp_port,
        imaps_port=args.imaps_port,
        tls=(args.cert, args.key) if args.cert else None,
        validator=IntrospectValidator(args.introspect_url),
        passwords=dict(p.split("=", 1) for p in args.password),
        names=GOOGLE_MAIL_DE_NAMES if args.names == "de" else GMAIL_NAMES,
    )
    with server:
        print(f"gmail test server: IMAP {args.host}:{server.imap_port} SMTP {args.host}:{server.smtp_port}", flush=True)
        if server.imaps_port:
            print(f"IMAPS {args.host}:{server.imaps_port}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(1):
                pass


if __name__ == "__main__":
    main()
