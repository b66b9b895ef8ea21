"""One IMAP connection to the Gmail test server: the command loop, Gmail's responses and the selected-folder view.

A session keeps its own view of the selected folder (UIDs in sequence order and the MODSEQ it last reported) and
turns model changes into EXISTS / EXPUNGE / FETCH at sync points, like a real server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
from typing import TYPE_CHECKING

from gmail.model import DELETED, GMAIL_KEYWORDS, SEEN, SYSTEM_FLAGS, Account, Folder
from gmail.selected import SelectedState
from gmail.wire import (
    LITERAL_AT_END,
    CommandError,
    ParseError,
    Token,
    as_list,
    decode_mutf7,
    encode_mutf7,
    parse_internaldate,
    quoted,
    text,
    tokenize,
)

if TYPE_CHECKING:
    from gmail.server import GmailServer

GREETING = b"* OK Gimap ready for requests from 127.0.0.1"
PRE_AUTH_CAPS = (
    "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 XYZZY SASL-IR AUTH=XOAUTH2 AUTH=PLAIN"
)
POST_AUTH_CAPS = (
    "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS {compress}ENABLE MOVE CONDSTORE "
    "ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS LITERAL- SPECIAL-USE APPENDLIMIT=35651584"
)
APPENDLIMIT = 35651584
INVALID_CREDENTIALS = b"NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
XOAUTH2_ERROR = base64.b64encode(b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}')
OVERQUOTA = b"NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)"
TOO_MANY = b"NO [ALERT] Too many simultaneous connections. (Failure)"
IMAP_DISABLED = (
    b"NO [ALERT] Your account is not enabled for IMAP use. Please visit your Gmail settings page and enable your "
    b"account for IMAP access. (Failure)"
)
SESSION_EXPIRED = b"* BYE Session expired, please login again."

ANY_STATE = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
NOT_AUTH = {"STARTTLS", "AUTHENTICATE", "LOGIN"}
SELECTED = {"CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "CHECK"}
SELECTED |= {f"UID {c}" for c in ("SEARCH", "FETCH", "STORE", "COPY", "MOVE", "EXPUNGE")}
NO_EXPUNGE_DURING = {"FETCH", "STORE", "SEARCH"}  # RFC 3501 7.4.1: sequence numbers must not shift under them


class ImapSession(SelectedState):
    def __init__(self, server: GmailServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool):
        self.server = server
        self.store = server.store
        self.counters = server.counters
        self.faults = server.faults
        self.reader = reader
        self.writer = writer
        self.tls = tls
        self.user: str | None = None
        self.account: Account | None = None
        self.folder: Folder | None = None
        self.readonly = False
        self.view: list[int] = []
        self.view_modseq: dict[int, int] = {}
        self.condstore = False
        self.utf8 = False
        self.changed = asyncio.Event()
        self.closed = False
        self._out: list[bytes] = []

    # --- I/O --------------------------------------------------------------------------------------------------
    def send(self, line: bytes) -> None:
        self._out.append(line + b"\r\n")

    async def flush(self) -> None:
        if self._out:
            self.writer.write(b"".join(self._out))
            self._out.clear()
        await self.writer.drain()

    def tagged(self, tag: bytes, status: str, rest: bytes) -> None:
        if status == "OK" and self.server.faults.take_throttle(self.user):
            rest = rest + b" [THROTTLED]"  # appended to an otherwise OK reply, as Gmail does
        self.send(tag + b" " + status.encode() + b" " + rest)

    async def bye(self, line: bytes = SESSION_EXPIRED) -> None:
        """Send an untagged BYE and close (server side)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._out.append(line + b"\r\n")
            await self.flush()
        self.writer.close()

    async def _read_command(self) -> bytes | None:
        line = await self.reader.readline()
        if not line:
            return None
        raw = line
        while match := LITERAL_AT_END.search(line):
            size = int(match.group(1))
            if not match.group(2):
                self.writer.write(b"+ go ahead\r\n")
                await self.writer.drain()
            raw += await self.reader.readexactly(size)
            line = await self.reader.readline()
            raw += line
        return raw

    async def run(self) -> None:
        self.send(GREETING)
        try:
            await self.flush()
            while not self.closed:
                raw = await self._read_command()
                if raw is None:
                    break
                await self._handle(raw)
                # counted before the reply goes out, so a client that has read n replies sees the BYE next
                expire = not self.closed and self.server.faults.bye_due(self.user)
                await self.flush()
                if expire:
                    await self.bye()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.closed = True
            self.server.session_closed(self)
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 1)

    async def _handle(self, raw: bytes) -> None:
        tag, _, rest = raw.partition(b" ")
        tag = tag.strip()
        if not tag or not rest.strip():
            self.send(b"* BAD Invalid tag")
            return
        try:
            tokens = tokenize(rest)
            name = str(tokens[0]).upper()
            if name == "UID" and len(tokens) > 1:
                name = "UID " + str(tokens[1]).upper()
                tokens = tokens[1:]
        except (ParseError, IndexError):
            self.tagged(tag, "BAD", b"Could not parse command")
            return
        if self.user:
            self.server.counters.command(self.user, name)
        handler = getattr(self, "cmd_" + name.lower().replace(" ", "_"), None)
        if handler is None:
            self.tagged(tag, "BAD", b"Unknown command")
            return
        if not self._state_allows(name):
            self.tagged(tag, "BAD", b"Command not valid in this state")
            return
        if self.user and name != "LOGOUT" and self.server.faults.has(self.server.faults.overquota, self.user):
            self.send(tag + b" " + OVERQUOTA)
            return
        try:
            await handler(tag, tokens[1:])
        except CommandError as exc:
            self.send(tag + b" " + exc.line)
        except (ParseError, IndexError, ValueError, TypeError):
            self.tagged(tag, "BAD", b"Could not parse command")
        if self.folder is not None and not self.closed and name not in ("SELECT", "EXAMINE"):
            self._sync(allow_expunge=name not in NO_EXPUNGE_DURING)
            self._out.sort(key=lambda line: line.startswith(tag + b" "))  # tagged reply last

    def _state_allows(self, name: str) -> bool:
        if name in ANY_STATE:
            return True
        if name in NOT_AUTH:
            return self.user is None
        if self.user is None:
            return False
        return name not in SELECTED or self.folder is not None

    # --- any state --------------------------------------------------------------------------------------------
    def capabilities(self) -> bytes:
        if self.user is None:
            caps = PRE_AUTH_CAPS + (" STARTTLS" if self.server.tls_context and not self.tls else "")
        else:
            caps = POST_AUTH_CAPS.format(compress="COMPRESS=DEFLATE " if self.server.advertise_compress else "")
        return caps.encode()

    async def cmd_capability(self, tag: bytes, args: list[Token]) -> None:
        self.send(b"* CAPABILITY " + self.capabilities())
        self.tagged(tag, "OK", b"Thats all she wrote! (Success)")

    async def cmd_noop(self, tag: bytes, args: list[Token]) -> None:
        self.tagged(tag, "OK", b"Success")

    async def cmd_check(self, tag: bytes, args: list[Token]) -> None:
        self.tagged(tag, "OK", b"Success")

    async def cmd_logout(self, tag: bytes, args: list[Token]) -> None:
        self.send(b"* BYE LOGOUT Requested")
        self.tagged(tag, "OK", b"73 GoodBye")
        await self.flush()
        self.closed = True

    async def cmd_id(self, tag: bytes, args: list[Token]) -> None:
        self.send(b'* ID ("name" "GImap" "vendor" "Google, Inc." "support-url" "https://support.google.com/mail")')
        self.tagged(tag, "OK", b"Success")

    async def cmd_compress(self, tag: bytes, args: list[Token]) -> None:
        raise CommandError(b"NO COMPRESS is not implemented by the test server (Failure)")

    # --- not authenticated ------------------------------------------------------------------------------------
    async def cmd_starttls(self, tag: bytes, args: list[Token]) -> None:
        if self.server.tls_context is None or self.tls:
            raise CommandError(b"BAD STARTTLS not available")
        self.tagged(tag, "OK", b"Begin TLS negotiation now")
        await self.flush()
        await self.writer.start_tls(self.server.tls_context)
        self.tls = True

    async def cmd_login(self, tag: bytes, args: list[Token]) -> None:
        user, password = text(args[0]).lower(), text(args[1])
        if self.server.passwords.get(user) != password:
            raise CommandError(INVALID_CREDENTIALS)
        self._logged_in(tag, user, "LOGIN")

    async def cmd_authenticate(self, tag: bytes, args: list[Token]) -> None:
        if self.server.faults.take_count("login_bye"):
            await self.bye(b"* BYE System error")
            return
        mechanism = text(args[0]).upper()
        if mechanism not in ("XOAUTH2", "PLAIN"):
            raise CommandError(b"NO [CANNOT] Unsupported authentication mechanism. (Failure)")
        if len(args) > 1:
            response = text(args[1]).encode()
        else:
            self.send(b"+ ")
            await self.flush()
            response = (await self.reader.readline()).strip()
        if response == b"*":
            raise CommandError(b"BAD Authentication cancelled")
        try:
            decoded = base64.b64decode(response, validate=True)
        except binascii.Error as exc:
            raise CommandError(b"BAD Invalid SASL argument. (Failure)") from exc
        if mechanism == "PLAIN":
            _, user, password = ([*decoded.decode("utf-8", "replace").split("\x00"), "", "", ""])[:3]
            if self.server.passwords.get(user.lower()) != password:
                raise CommandError(INVALID_CREDENTIALS)
            self._logged_in(tag, user.lower(), "AUTHENTICATE")
            return
        user, token = parse_xoauth2(decoded)
        loop = asyncio.get_running_loop()
        valid = bool(user) and await loop.run_in_executor(None, self.server.check_token, user, token)
        if not valid:
            # Gmail's XOAUTH2 failure: a JSON error as a challenge, the client's (empty) answer, then NO
            self.send(b"+ " + XOAUTH2_ERROR)
            await self.flush()
            await self.reader.readline()
            raise CommandError(INVALID_CREDENTIALS)
        self._logged_in(tag, user.lower(), "AUTHENTICATE")

    def _logged_in(self, tag: bytes, user: str, command: str) -> None:
        faults = self.server.faults
        if faults.take_count("login_unavailable"):
            raise CommandError(b"NO [UNAVAILABLE] Temporary System Problem")
        if user in faults.imap_disabled:
            raise CommandError(IMAP_DISABLED)
        if not self.server.counters.try_connect(user, faults.limit_for(user)):
            raise CommandError(TOO_MANY)
        self.user = user
        self.account = self.store.account(user)
        self.server.session_opened(self)
        self.server.counters.command(user, command)
        self.send(b"* CAPABILITY " + self.capabilities())
        self.tagged(tag, "OK", user.encode() + b" authenticated (Success)")

    # --- authenticated ----------------------------------------------------------------------------------------
    def _folder_arg(self, token: Token) -> str:
        name = text(token)
        return name if self.utf8 else decode_mutf7(name)

    def _folder_out(self, name: str) -> bytes:
        if self.server.faults.has(self.server.faults.raw_folder_names, self.user):
            return quoted(name)  # a non-compliant server: "R&D" as is, where modified UTF-7 says "R&-D"
        return quoted(name if self.utf8 else encode_mutf7(name))

    def _require(self) -> Account:
        assert self.account is not None
        return self.account

    async def cmd_enable(self, tag: bytes, args: list[Token]) -> None:
        enabled = []
        for cap in (text(a).upper() for a in args):
            if cap == "CONDSTORE":
                self.condstore = True
                enabled.append(cap)
            elif cap == "UTF8=ACCEPT":
                self.utf8 = True
                enabled.append(cap)
        self.send(b"* ENABLED" + b"".join(b" " + c.encode() for c in enabled))
        self.tagged(tag, "OK", b"Success")

    async def cmd_namespace(self, tag: bytes, args: list[Token]) -> None:
        self.send(b'* NAMESPACE (("" "/")) NIL NIL')
        self.tagged(tag, "OK", b"Success")

    async def cmd_getquotaroot(self, tag: bytes, args: list[Token]) -> None:
        self.send(b"* QUOTAROOT " + self._folder_out(self._folder_arg(args[0])) + b' ""')
        await self.cmd_getquota(tag, [b""])

    async def cmd_getquota(self, tag: bytes, args: list[Token]) -> None:
        with self.store.lock:
            used = sum(len(m.raw) for m in self._require().messages.values()) // 1024
        self.send(b'* QUOTA "" (STORAGE %d 15728640)' % used)
        self.tagged(tag, "OK", b"Success")

    async def cmd_subscribe(self, tag: bytes, args: list[Token]) -> None:
        self.tagged(tag, "OK", b"Success")

    cmd_unsubscribe = cmd_subscribe

    async def cmd_create(self, tag: bytes, args: list[Token]) -> None:
        name = self._folder_arg(args[0]).rstrip("/")
        account = self._require()
        with self.store.lock:
            if name.upper() == "INBOX" or name in account.folders or name == account.names.root:
                raise CommandError(b"NO [ALREADYEXISTS] Folder name conflicts with existing folder name. (Failure)")
            if name.startswith(account.names.root + "/"):
                raise CommandError(b"NO [CANNOT] Folder name is not allowed. (Failure)")
            account.ensure_label(name)
        self.tagged(tag, "OK", b"Success")

    async def cmd_delete(self, tag: bytes, args: list[Token]) -> None:
        name = self._folder_arg(args[0])
        account = self._require()
        with self.store.lock:
            folder = account.folder(name)
            if folder is None or folder.special_use or folder.name == "INBOX":
                raise CommandError(b"NO [CANNOT] Cannot delete this folder. (Failure)")
            account.delete_label(folder.name)
        self.tagged(tag, "OK", b"Success")

    def _list_entries(self, pattern: str, xlist: bool = False) -> list[tuple[list[str], str]]:
        account = self._require()
        source = "^" + "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern) + "$"
        regex, inbox_regex = re.compile(source), re.compile(source, re.IGNORECASE)
        with self.store.lock:
            folders = account.visible_folders()
            names = [f.name for f in folders]
            entries: list[tuple[list[str], str]] = []
            for folder in folders:
                attrs = ["\\HasChildren" if any(n.startswith(folder.name + "/") for n in names) else "\\HasNoChildren"]
                if xlist:
                    attrs += [_XLIST.get(folder.special_use or "", "")] if folder.special_use else []
                    attrs += ["\\Inbox"] if folder.name == "INBOX" else []
                elif folder.special_use:
                    attrs.append(folder.special_use)
                entries.append((attrs, folder.name))
            entries.append((["\\HasChildren", "\\Noselect"], account.names.root))
        entries.sort(key=lambda e: (e[1] != "INBOX", e[1]))
        return [e for e in entries if (inbox_regex if e[1] == "INBOX" else regex).match(e[1])]

    async def cmd_list(self, tag: bytes, args: list[Token], command: bytes = b"LIST") -> None:
        selection: list[str] = []
        if args and isinstance(args[0], list):
            selection = [text(t).upper() for t in as_list(args.pop(0))]
        reference, pattern = self._folder_arg(args[0]), self._folder_arg(args[1])
        returns: list[Token] = []
        if len(args) > 3 and text(args[2]).upper() == "RETURN" and isinstance(args[3], list):
            returns = args[3]
        if not pattern:
            self.send(b"* " + command + b' (\\Noselect) "/" ""')
            self.tagged(tag, "OK", b"Success")
            return
        status_items: list[Token] | None = None
        for i, item in enumerate(returns):
            if isinstance(item, str) and item.upper() == "STATUS" and isinstance(returns[i + 1], list):
                status_items = as_list(returns[i + 1])
        for attrs, name in self._list_entries(reference + pattern, xlist=command == b"XLIST"):
            if "SPECIAL-USE" in selection and not (set(attrs) & _SPECIAL_USE):
                continue
            flags = " ".join(attrs).encode()
            self.send(b"* " + command + b" (" + flags + b') "/" ' + self._folder_out(name))
            if status_items is not None and "\\Noselect" not in attrs:
                self.send(self._status_line(name, status_items))
        self.tagged(tag, "OK", b"Success")

    async def cmd_lsub(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_list(tag, args, b"LSUB")

    async def cmd_xlist(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_list(tag, args, b"XLIST")

    def _status_line(self, name: str, items: list[Token]) -> bytes:
        account = self._require()
        with self.store.lock:
            folder = account.folder(name)
            if folder is None:
                raise CommandError(b"NO [NONEXISTENT] Unknown Mailbox: " + name.encode() + b" (Failure)")
            values = {
                "MESSAGES": len(folder.uids),
                "RECENT": 0,
                "UIDNEXT": folder.uidnext,
                "UIDVALIDITY": folder.uidvalidity,
                "UNSEEN": sum(1 for gm in folder.uids.values() if SEEN not in account.messages[gm].flags),
                "HIGHESTMODSEQ": folder.highestmodseq,
            }
        out = []
        for item in (text(i).upper() for i in items):
            if item not in values:
                raise ParseError(f"unknown STATUS item {item}")
            out.append(b"%s %d" % (item.encode(), values[item]))
        return b"* STATUS " + self._folder_out(name) + b" (" + b" ".join(out) + b")"

    async def cmd_status(self, tag: bytes, args: list[Token]) -> None:
        items: list[Token] = args[1] if isinstance(args[1], list) else [args[1]]
        self.send(self._status_line(self._folder_arg(args[0]), items))
        self.tagged(tag, "OK", b"Success")

    async def cmd_select(self, tag: bytes, args: list[Token], readonly: bool = False) -> None:
        name = self._folder_arg(args[0])
        if len(args) > 1 and isinstance(args[1], list) and any(text(t).upper() == "CONDSTORE" for t in args[1]):
            self.condstore = True
        account = self._require()
        self.folder = None
        with self.store.lock:
            folder = account.folder(name)
            if folder is None:
                raise CommandError(
                    b"NO [NONEXISTENT] Unknown Mailbox: " + name.encode() + b" (now in authenticated state) (Failure)"
                )
            self.folder, self.readonly = folder, readonly
            self.view = list(folder.uids)
            self.view_modseq = {uid: account.messages[gm].modseq for uid, gm in folder.uids.items()}
            keywords = sorted({f for m in account.messages.values() for f in m.flags if not f.startswith("\\")})
            flags = " ".join([*SYSTEM_FLAGS, *sorted(set(GMAIL_KEYWORDS) | set(keywords))]).encode()
            self.send(b"* FLAGS (" + flags + b")")
            permanent = b"()" if readonly else b"(" + flags + b" \\*)"
            self.send(b"* OK [PERMANENTFLAGS " + permanent + b"] Flags permitted.")
            self.send(b"* OK [UIDVALIDITY %d] UIDs valid." % folder.uidvalidity)
            self.send(b"* %d EXISTS" % len(self.view))
            self.send(b"* 0 RECENT")
            self.send(b"* OK [UIDNEXT %d] Predicted next UID." % folder.uidnext)
            self.send(b"* OK [HIGHESTMODSEQ %d]" % folder.highestmodseq)
        mode = b"[READ-ONLY]" if readonly else b"[READ-WRITE]"
        self.tagged(tag, "OK", mode + b" " + self._folder_out(name).strip(b'"') + b" selected. (Success)")

    async def cmd_examine(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_select(tag, args, readonly=True)

    async def cmd_append(self, tag: bytes, args: list[Token]) -> None:
        name = self._folder_arg(args[0])
        message = args[-1]
        if not isinstance(message, bytes):
            raise ParseError("APPEND needs a message literal")
        if len(message) > APPENDLIMIT:
            raise CommandError(b"NO [TOOBIG] Message too large. (Failure)")
        flags = [text(f) for f in args[1]] if len(args) > 2 and isinstance(args[1], list) else []
        date = args[-2] if len(args) > 2 and isinstance(args[-2], bytes) else None
        account = self._require()
        with self.store.lock:
            folder = account.folder(name)
            if folder is None:
                raise CommandError(b"NO [TRYCREATE] Folder doesn't exist. (Failure)")
            labels = [folder.label] if folder.label else []
            msg = account.add(
                message,
                labels=labels,
                flags=[f for f in flags if f != DELETED],
                internaldate=parse_internaldate(date.decode()) if date else None,
            )
            uid = folder.by_msgid.get(msg.gm_msgid, 0)
        self.tagged(tag, "OK", b"[APPENDUID %d %d] (Success)" % (folder.uidvalidity, uid))

    async def cmd_idle(self, tag: bytes, args: list[Token]) -> None:
        self.send(b"+ idling")
        await self.flush()
        read = asyncio.create_task(self.reader.readline())
        wake: asyncio.Task[bool] | None = None
        try:
            while True:
                self.changed.clear()
                if self.folder is not None:
                    self._sync(allow_expunge=True)
                await self.flush()
                wake = asyncio.create_task(self.changed.wait())
                done, _ = await asyncio.wait({read, wake}, return_when=asyncio.FIRST_COMPLETED)
                if read in done:
                    break
        finally:
            for task in (read, wake):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        line = read.result()
        if not line:
            raise ConnectionResetError("client went away during IDLE")
        if line.strip().upper() != b"DONE":
            raise CommandError(b"BAD Expected DONE")
        self.tagged(tag, "OK", b"IDLE terminated (Success)")


_XLIST = {
    "\\All": "\\AllMail",
    "\\Drafts": "\\Drafts",
    "\\Important": "\\Important",
    "\\Sent": "\\Sent",
    "\\Junk": "\\Spam",
    "\\Flagged": "\\Starred",
    "\\Trash": "\\Trash",
}
_SPECIAL_USE = set(_XLIST)


def parse_xoauth2(decoded: bytes) -> tuple[str, str]:
    """``user=U\\x01auth=Bearer T\\x01\\x01`` -> (U, T); empty strings when malformed."""
    fields = dict(part.split("=", 1) for part in decoded.decode("utf-8", "replace").split("\x01") if "=" in part)
    auth = fields.get("auth", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return fields.get("user", "").strip(), token
