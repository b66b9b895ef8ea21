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

from gmail import mime
from gmail.model import DELETED, GMAIL_KEYWORDS, SEEN, SYSTEM_FLAGS, TRASH, Account, Folder, Message, canonical_label
from gmail.search import Candidate, compile_search
from gmail.wire import (
    LITERAL_AT_END,
    ParseError,
    Token,
    astring,
    compress_set,
    decode_mutf7,
    encode_mutf7,
    in_ranges,
    internaldate,
    parse_internaldate,
    parse_sequence_set,
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
BODY_ITEM = re.compile(r"(BODY|BODY\.PEEK|BINARY\.PEEK|BINARY)\[(.*)\](?:<(\d+)(?:\.(\d+))?>)?$", re.IGNORECASE | re.S)


class CommandError(Exception):
    """Ends a command with a tagged NO or BAD carrying ``line``."""

    def __init__(self, line: bytes):
        super().__init__(line.decode(errors="replace"))
        self.line = line


class ImapSession:
    def __init__(self, server: GmailServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool):
        self.server = server
        self.store = server.store
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
            rest = b"[THROTTLED] " + rest
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
                await self.flush()
                if not self.closed and self.server.faults.bye_due(self.user):
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
            selection = [text(t).upper() for t in args.pop(0)]  # type: ignore[union-attr]
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
                status_items = returns[i + 1]  # type: ignore[assignment]
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
        items = args[1] if isinstance(args[1], list) else [args[1]]
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
        flags = [text(f) for f in args[1]] if len(args) > 2 and isinstance(args[1], list) else []  # type: ignore[union-attr]
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
        read = asyncio.ensure_future(self.reader.readline())
        wake: asyncio.Future[bool] | None = None
        try:
            while True:
                self.changed.clear()
                if self.folder is not None:
                    self._sync(allow_expunge=True)
                await self.flush()
                wake = asyncio.ensure_future(self.changed.wait())
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

    # --- selected ---------------------------------------------------------------------------------------------
    def _sync(self, *, allow_expunge: bool) -> None:
        """Report what changed in the selected folder since the session last looked."""
        folder, account = self.folder, self._require()
        assert folder is not None
        with self.store.lock:
            current = folder.uids if account.folders.get(folder.name) is folder else {}
            if allow_expunge:
                for index in range(len(self.view) - 1, -1, -1):
                    if self.view[index] not in current:
                        self.send(b"* %d EXPUNGE" % (index + 1))
                        self.view_modseq.pop(self.view.pop(index), None)
            known = set(self.view)
            last = self.view[-1] if self.view else 0
            new = [uid for uid in current if uid not in known and uid > last]
            for uid, gm in current.items():
                msg = account.messages[gm]
                if uid in known and msg.modseq > self.view_modseq.get(uid, 0):
                    seq = self.view.index(uid) + 1
                    items = [b"X-GM-LABELS " + self._labels(msg), b"UID %d" % uid]
                    items += [b"MODSEQ (%d)" % msg.modseq, b"FLAGS " + self._flags(msg, uid)]
                    self.send(b"* %d FETCH (%s)" % (seq, b" ".join(items)))
                    self.view_modseq[uid] = msg.modseq
            if new:
                self.view += new
                for uid in new:
                    self.view_modseq[uid] = account.messages[current[uid]].modseq
                self.send(b"* %d EXISTS" % len(self.view))

    def _targets(self, spec: Token, uid_mode: bool) -> list[tuple[int, int]]:
        """(seq, uid) pairs of the selected view matching a sequence set."""
        spec_text = text(spec)
        if uid_mode:
            ranges = parse_sequence_set(spec_text, self.view[-1] if self.view else 0)
            return [(i + 1, uid) for i, uid in enumerate(self.view) if in_ranges(uid, ranges)]
        ranges = parse_sequence_set(spec_text, len(self.view))
        return [(i + 1, uid) for i, uid in enumerate(self.view) if in_ranges(i + 1, ranges)]

    def _message(self, uid: int) -> Message | None:
        assert self.folder is not None
        gm = self.folder.uids.get(uid)
        return self._require().messages.get(gm) if gm is not None else None

    def _flags(self, msg: Message, uid: int) -> bytes:
        assert self.folder is not None
        flags = sorted(msg.flags) + ([DELETED] if uid in self.folder.deleted else [])
        return b"(" + " ".join(flags).encode() + b")"

    def _labels(self, msg: Message) -> bytes:
        """X-GM-LABELS as Gmail sends them: system labels quoted (backslash escaped), the folder's own omitted."""
        assert self.folder is not None
        own = self.folder.label
        labels = sorted(msg.labels - {own} if own else msg.labels, key=lambda lb: (not lb.startswith("\\"), lb))
        out = [quoted(lb) if lb.startswith("\\") else astring(lb if self.utf8 else encode_mutf7(lb)) for lb in labels]
        return b"(" + b" ".join(out) + b")"

    async def cmd_fetch(self, tag: bytes, args: list[Token], uid_mode: bool = False) -> None:
        items = _fetch_items(args[1])
        changedsince = _modifier(args[2] if len(args) > 2 else None, "CHANGEDSINCE")
        if uid_mode and "UID" not in [i.upper() for i in items]:
            items.insert(0, "UID")
        if changedsince is not None and "MODSEQ" not in [i.upper() for i in items]:
            items.append("MODSEQ")
        account = self._require()
        for seq, uid in self._targets(args[0], uid_mode):
            with self.store.lock:
                msg = self._message(uid)
                if msg is None or (changedsince is not None and msg.modseq <= changedsince):
                    continue
                wants_seen = any(_sets_seen(i) for i in items) and not self.readonly and SEEN not in msg.flags
                if wants_seen:
                    account.change(msg, add_flags=[SEEN])
                out = [self._fetch_item(item, msg, uid) for item in items]
                if wants_seen and "FLAGS" not in [i.upper() for i in items]:
                    out.append(b"FLAGS " + self._flags(msg, uid))
                if wants_seen and self.condstore and "MODSEQ" not in [i.upper() for i in items]:
                    out.append(b"MODSEQ (%d)" % msg.modseq)
                self.view_modseq[uid] = msg.modseq
            self.send(b"* %d FETCH (%s)" % (seq, b" ".join(out)))
        self.tagged(tag, "OK", b"Success")

    def _fetch_item(self, item: str, msg: Message, uid: int) -> bytes:  # noqa: PLR0911
        key = item.upper()
        if key == "UID":
            return b"UID %d" % uid
        if key == "FLAGS":
            return b"FLAGS " + self._flags(msg, uid)
        if key == "INTERNALDATE":
            return b"INTERNALDATE " + internaldate(msg.internaldate)
        if key == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % len(msg.raw)
        if key == "X-GM-MSGID":
            return b"X-GM-MSGID %d" % msg.gm_msgid
        if key == "X-GM-THRID":
            return b"X-GM-THRID %d" % msg.gm_thrid
        if key == "X-GM-LABELS":
            return b"X-GM-LABELS " + self._labels(msg)
        if key == "MODSEQ":
            return b"MODSEQ (%d)" % msg.modseq
        if key == "ENVELOPE":
            return b"ENVELOPE " + mime.envelope(mime.parse(msg.raw))
        if key in ("BODYSTRUCTURE", "BODY"):
            return key.encode() + b" " + mime.bodystructure(mime.parse(msg.raw), extended=key == "BODYSTRUCTURE")
        if key in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            spec = {"RFC822": "", "RFC822.HEADER": "HEADER", "RFC822.TEXT": "TEXT"}[key]
            return key.encode() + b" " + self._literal(mime.section(mime.parse(msg.raw), msg.raw, spec))
        match = BODY_ITEM.match(item)
        if not match:
            raise ParseError(f"unknown FETCH item {item}")
        data = mime.section(mime.parse(msg.raw), msg.raw, match.group(2))
        name = match.group(1).upper().replace(".PEEK", "") + "[" + match.group(2) + "]"
        if match.group(3) is not None:
            start = int(match.group(3))
            data = data[start : start + int(match.group(4))] if match.group(4) else data[start:]
            name += f"<{start}>"
        return name.encode() + b" " + self._literal(data)

    def _literal(self, data: bytes) -> bytes:
        assert self.user is not None
        self.server.counters.sent_bytes(self.user, len(data))
        return b"{%d}\r\n%s" % (len(data), data)

    async def cmd_uid_fetch(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_fetch(tag, args, uid_mode=True)

    async def cmd_search(self, tag: bytes, args: list[Token], uid_mode: bool = False) -> None:
        returns: list[str] | None = None
        if args and isinstance(args[0], str) and args[0].upper() == "RETURN":
            returns = [text(t).upper() for t in args[1]] or ["ALL"]  # type: ignore[union-attr]
            args = args[2:]
        if args and isinstance(args[0], str) and args[0].upper() == "CHARSET":
            if text(args[1]).upper() not in ("UTF-8", "US-ASCII"):
                raise CommandError(b"NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset. (Failure)")
            args = args[2:]
        self._require()
        with self.store.lock:
            query = compile_search(args, len(self.view), self.view[-1] if self.view else 0)
            hits: list[tuple[int, int, int]] = []
            assert self.folder is not None
            for seq, uid in enumerate(self.view, start=1):
                msg = self._message(uid)
                if msg and query.match(Candidate(seq, uid, msg, uid in self.folder.deleted)):
                    hits.append((seq, uid, msg.modseq))
        numbers = [uid if uid_mode else seq for seq, uid, _ in hits]
        if returns is not None:
            self.send(
                _esearch(tag, uid_mode, returns, numbers, max((h[2] for h in hits), default=0), query.uses_modseq)
            )
        else:
            line = b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
            if query.uses_modseq and hits:
                line += b" (MODSEQ %d)" % max(h[2] for h in hits)
            self.send(line)
        self.tagged(tag, "OK", b"SEARCH completed (Success)")

    async def cmd_uid_search(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_search(tag, args, uid_mode=True)

    async def cmd_store(self, tag: bytes, args: list[Token], uid_mode: bool = False) -> None:
        if self.readonly:
            raise CommandError(b"NO STORE attempt on READ-ONLY folder (Failure)")
        unchangedsince = None
        if isinstance(args[1], list):
            unchangedsince = _modifier(args[1], "UNCHANGEDSINCE")
            args = [args[0], *args[2:]]
        action = text(args[1]).upper()
        silent = action.endswith(".SILENT")
        action = action.removesuffix(".SILENT")
        values = args[2] if isinstance(args[2], list) else args[2:]
        what = action.lstrip("+-")
        mode = action[0] if action[0] in "+-" else "="
        if what not in ("FLAGS", "X-GM-LABELS"):
            raise ParseError(f"bad STORE item {what}")
        account, folder = self._require(), self.folder
        assert folder is not None
        modified = []
        for seq, uid in self._targets(args[0], uid_mode):
            with self.store.lock:
                msg = self._message(uid)
                if msg is None:
                    continue
                if unchangedsince is not None and msg.modseq > unchangedsince:
                    modified.append(uid if uid_mode else seq)
                    continue
                if what == "FLAGS":
                    self._store_flags(account, folder, msg, uid, mode, {text(v) for v in values})
                else:
                    self._store_labels(account, msg, mode, {canonical_label(self._label_arg(v)) for v in values})
                self.view_modseq[uid] = msg.modseq
                if not silent or unchangedsince is not None:
                    item = b"FLAGS " + self._flags(msg, uid) if what == "FLAGS" else b"X-GM-LABELS " + self._labels(msg)
                    extra = b" MODSEQ (%d)" % msg.modseq if self.condstore else b""
                    prefix = b"UID %d " % uid if uid_mode else b""
                    self.send(b"* %d FETCH (%s%s%s)" % (seq, prefix, item, extra))
        if modified:
            self.tagged(tag, "OK", b"[MODIFIED " + compress_set(modified).encode() + b"] Conditional STORE failed")
        else:
            self.tagged(tag, "OK", b"Success")

    def _label_arg(self, token: Token) -> str:
        value = text(token)
        return value if self.utf8 or value.startswith("\\") else decode_mutf7(value)

    def _store_flags(
        self, account: Account, folder: Folder, msg: Message, uid: int, mode: str, flags: set[str]
    ) -> None:
        current = msg.flags | ({DELETED} if uid in folder.deleted else set())
        add = flags if mode == "+" else (flags - current if mode == "=" else set())
        remove = flags if mode == "-" else (current - flags if mode == "=" else set())
        if DELETED in add:
            account.set_deleted(folder, uid, True)
        if DELETED in remove:
            account.set_deleted(folder, uid, False)
        account.change(msg, add_flags=add - {DELETED}, remove_flags=remove - {DELETED})

    def _store_labels(self, account: Account, msg: Message, mode: str, labels: set[str]) -> None:
        if mode == "+":
            account.change(msg, add_labels=labels)
        elif mode == "-":
            account.change(msg, remove_labels=labels)
        else:
            account.change(msg, add_labels=labels - msg.labels, remove_labels=msg.labels - labels)

    async def cmd_uid_store(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_store(tag, args, uid_mode=True)

    async def cmd_copy(self, tag: bytes, args: list[Token], uid_mode: bool = False, move: bool = False) -> None:
        account, source = self._require(), self.folder
        assert source is not None
        targets = self._targets(args[0], uid_mode)
        with self.store.lock:
            dest = account.folder(self._folder_arg(args[1]))
            if dest is None:
                raise CommandError(b"NO [TRYCREATE] Folder doesn't exist. (Failure)")
            pairs = []
            for _, uid in targets:
                msg = self._message(uid)
                if msg is None:
                    continue
                if dest.label is None:  # into All Mail: out of Trash/Spam, no label to add
                    account.change(msg, remove_labels=[TRASH, "\\Spam"])
                else:
                    account.change(msg, add_labels=[dest.label])
                if move and source is not dest and source.label is not None:
                    account.change(msg, remove_labels=[source.label])
                if msg.gm_msgid in dest.by_msgid:
                    pairs.append((uid, dest.by_msgid[msg.gm_msgid]))
        code = b""
        if pairs:
            src_set = compress_set([p[0] for p in pairs]).encode()
            dst_set = ",".join(str(p[1]) for p in pairs).encode()
            code = b"[COPYUID %d %s %s] " % (dest.uidvalidity, src_set, dst_set)
        if move:
            self.send(b"* OK " + code + b"(Success)")
            self._sync(allow_expunge=True)
            self.tagged(tag, "OK", b"Success")
        else:
            self.tagged(tag, "OK", code + b"(Success)")

    async def cmd_uid_copy(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_copy(tag, args, uid_mode=True)

    async def cmd_move(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_copy(tag, args, move=True)

    async def cmd_uid_move(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_copy(tag, args, uid_mode=True, move=True)

    async def cmd_expunge(self, tag: bytes, args: list[Token], uids: set[int] | None = None) -> None:
        if self.readonly:
            raise CommandError(b"NO EXPUNGE attempt on READ-ONLY folder (Failure)")
        assert self.folder is not None
        with self.store.lock:
            self._require().expunge(self.folder, uids)
        self._sync(allow_expunge=True)
        self.tagged(tag, "OK", b"Success")

    async def cmd_uid_expunge(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_expunge(tag, args, uids={uid for _, uid in self._targets(args[0], uid_mode=True)})

    async def cmd_close(self, tag: bytes, args: list[Token]) -> None:
        if not self.readonly and self.folder is not None:
            with self.store.lock:
                self._require().expunge(self.folder)
        self.folder = None
        self.view, self.view_modseq = [], {}
        self.tagged(tag, "OK", b"Returned to authenticated state. (Success)")

    async def cmd_unselect(self, tag: bytes, args: list[Token]) -> None:
        self.folder = None
        self.view, self.view_modseq = [], {}
        self.tagged(tag, "OK", b"Returned to authenticated state. (Success)")


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


def _fetch_items(token: Token) -> list[str]:
    macros = {
        "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
        "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
        "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
    }
    if isinstance(token, list):
        return [text(t) for t in token]
    item = text(token)
    return list(macros.get(item.upper(), [item]))


def _sets_seen(item: str) -> bool:
    key = item.upper()
    return key in ("RFC822", "RFC822.TEXT") or key.startswith(("BODY[", "BINARY["))


def _modifier(token: Token, name: str) -> int | None:
    if token is None:
        return None
    if not isinstance(token, list):
        raise ParseError("modifiers must be a list")
    words = [text(t).upper() for t in token]
    if "VANISHED" in words:
        raise CommandError(b"BAD QRESYNC is not supported")
    for i, word in enumerate(words):
        if word == name:
            return int(words[i + 1])
    return None


def _esearch(
    tag: bytes, uid_mode: bool, returns: list[str], numbers: list[int], modseq: int, uses_modseq: bool
) -> bytes:
    out = b"* ESEARCH (TAG " + quoted(tag) + b")" + (b" UID" if uid_mode else b"")
    if numbers:
        if "MIN" in returns:
            out += b" MIN %d" % min(numbers)
        if "MAX" in returns:
            out += b" MAX %d" % max(numbers)
        if "ALL" in returns:
            out += b" ALL " + compress_set(numbers).encode()
    if "COUNT" in returns:
        out += b" COUNT %d" % len(numbers)
    if uses_modseq and numbers:
        out += b" MODSEQ %d" % modseq
    return out
