"""The selected state of an IMAP session: the folder view (UIDs in sequence order, MODSEQ last reported) and the
commands that work on it: FETCH, SEARCH, STORE, COPY/MOVE, EXPUNGE, CLOSE. Mixed into ``ImapSession``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gmail import mime
from gmail.model import DELETED, SEEN, TRASH, Account, Folder, Message, canonical_label
from gmail.search import Candidate, compile_search
from gmail.wire import (
    CommandError,
    ParseError,
    Token,
    as_list,
    astring,
    compress_set,
    decode_mutf7,
    encode_mutf7,
    in_ranges,
    internaldate,
    parse_sequence_set,
    quoted,
    text,
)

if TYPE_CHECKING:
    from gmail.faults import Counters, Faults
    from gmail.model import Store

BODY_ITEM = re.compile(r"(BODY|BODY\.PEEK|BINARY\.PEEK|BINARY)\[(.*)\](?:<(\d+)(?:\.(\d+))?>)?$", re.IGNORECASE | re.S)


class SelectedState:
    # provided by ImapSession
    store: Store
    user: str | None
    folder: Folder | None
    readonly: bool
    condstore: bool
    utf8: bool
    view: list[int]
    view_modseq: dict[int, int]
    counters: Counters
    faults: Faults

    def send(self, line: bytes) -> None:
        raise NotImplementedError

    def tagged(self, tag: bytes, status: str, rest: bytes) -> None:
        raise NotImplementedError

    def _require(self) -> Account:
        raise NotImplementedError

    def _folder_arg(self, token: Token) -> str:
        raise NotImplementedError

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
            position: dict[int, int] | None = None
            for uid, gm in current.items():
                msg = account.messages[gm]
                if uid in known and msg.modseq > self.view_modseq.get(uid, 0):
                    if position is None:
                        position = {u: i for i, u in enumerate(self.view)}
                    seq = position[uid] + 1
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
        failed = False
        for seq, uid in self._targets(args[0], uid_mode):
            with self.store.lock:
                msg = self._message(uid)
                if msg is None or (changedsince is not None and msg.modseq <= changedsince):
                    continue
                if msg.gm_msgid in self.faults.unfetchable:  # the unfetchable fault: no reply for it, NO at the end
                    failed = True
                    continue
                # the withhold_body fault: the reply comes without the message's content, the other items in it
                sent = [i for i in items if not (_carries_content(i) and self.faults.body_withheld(msg.gm_msgid))]
                wants_seen = any(_sets_seen(i) for i in sent) and not self.readonly and SEEN not in msg.flags
                if wants_seen:
                    account.change(msg, add_flags=[SEEN])
                out = [self._fetch_item(item, msg, uid) for item in sent]
                if wants_seen and "FLAGS" not in [i.upper() for i in items]:
                    out.append(b"FLAGS " + self._flags(msg, uid))
                if wants_seen and self.condstore and "MODSEQ" not in [i.upper() for i in items]:
                    out.append(b"MODSEQ (%d)" % msg.modseq)
                self.view_modseq[uid] = msg.modseq
            self.send(b"* %d FETCH (%s)" % (seq, b" ".join(out)))
        if failed:
            self.tagged(tag, "NO", b"Some messages could not be FETCHed (Failure)")
            return
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
            return b"ENVELOPE " + mime.envelope(mime.parse_cached(msg.raw))
        if key in ("BODYSTRUCTURE", "BODY"):
            return key.encode() + b" " + mime.bodystructure(mime.parse_cached(msg.raw), extended=key == "BODYSTRUCTURE")
        if key in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            spec = {"RFC822": "", "RFC822.HEADER": "HEADER", "RFC822.TEXT": "TEXT"}[key]
            return key.encode() + b" " + self._literal(mime.section(mime.parse_cached(msg.raw), msg.raw, spec))
        match = BODY_ITEM.match(item)
        if not match:
            raise ParseError(f"unknown FETCH item {item}")
        data = mime.section(mime.parse_cached(msg.raw), msg.raw, match.group(2))
        name = match.group(1).upper().replace(".PEEK", "") + "[" + match.group(2) + "]"
        if match.group(3) is not None:
            start = int(match.group(3))
            data = data[start : start + int(match.group(4))] if match.group(4) else data[start:]
            name += f"<{start}>"
        return name.encode() + b" " + self._literal(data)

    def _literal(self, data: bytes) -> bytes:
        assert self.user is not None
        self.counters.sent_bytes(self.user, len(data))
        return b"{%d}\r\n%s" % (len(data), data)

    async def cmd_uid_fetch(self, tag: bytes, args: list[Token]) -> None:
        await self.cmd_fetch(tag, args, uid_mode=True)

    async def cmd_search(self, tag: bytes, args: list[Token], uid_mode: bool = False) -> None:
        returns: list[str] | None = None
        if args and isinstance(args[0], str) and args[0].upper() == "RETURN":
            returns = [text(t).upper() for t in as_list(args[1])] or ["ALL"]
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


def _carries_content(item: str) -> bool:
    """A FETCH item with the message's content (its bytes or a body part), not only header fields."""
    if item.upper() in ("RFC822", "RFC822.TEXT"):
        return True
    match = BODY_ITEM.match(item)
    return match is not None and "HEADER" not in match.group(2).upper()


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
