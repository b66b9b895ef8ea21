"""A loopback TCP proxy that injects faults at chosen points of a plain IMAP or SMTP dialogue: drop the connection
(both sides closed), stall it (nothing forwarded for N s or for good) or slow it (N bytes/s each way).

It runs its own asyncio loop on its own thread, so synchronous clients (imapclient in the test thread, `inboxd run`
in a subprocess) go through it as they would through a bad network. It reads the plaintext dialogue, so only plain
IMAP (``imap_tls = "plain"``, allowed to loopback hosts) and plain SMTP (``smtp_tls = "plain"``) can be faulted at
protocol points; ``AfterBytes`` works on any stream.

    with FaultProxy(stack.host, stack.imap_port) as proxy:
        proxy.arm(InFetchLiteral(5), Drop())  # 5th BODY[] literal of any connection, halfway through
        ... point the client at 127.0.0.1:proxy.port ...
        assert proxy.events  # what was injected, and where

Points (triggers): ``AfterBytes`` (K bytes server->client, or client->server), ``InFetchLiteral`` (inside the
Nth ``{n}`` literal of FETCH responses), ``OnCommand`` (when the client sends a command, e.g. IDLE, or one whose line
contains given bytes, before it is forwarded), ``OnIdling`` (right after the server's continuation to IDLE,
``+ idling``), ``AfterDataReply`` (SMTP: the server's final reply to the message body, swallowed or forwarded).
Actions: ``Drop``, ``Stall``, ``Slow``, and ``Refuse`` (IMAP, at ``OnCommand``: the command never reaches the server,
the client gets a tagged ``NO``, as from a server refusing it while the connection keeps working).
``drop_connections()`` drops live connections at once (e.g. the ones idling). Counters: connections accepted, bytes
forwarded each way, connections idling.
tests/harness/smtp_proxy.py (SmtpFaultProxy) is the older SMTP-only proxy on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Protocol

Direction = Literal["up", "down"]  # up: client -> server; down: server -> client
Wire = Literal["imap", "smtp"]

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r?\n$")
_FETCH = re.compile(rb"^\* \d+ FETCH\b", re.IGNORECASE)
END_OF_DATA = b"\r\n.\r\n"


# --- what the dialogue parsers report (positions are absolute offsets in their direction's byte stream) ----------


@dataclass(frozen=True, slots=True)
class LiteralStart:
    """A server literal inside a FETCH response: its bytes are [pos, pos + size)."""

    pos: int
    size: int
    index: int  # 1-based count of FETCH literals on this connection
    before: bytes  # the response text just before "{n}", e.g. b"... BODY[]"


@dataclass(frozen=True, slots=True)
class Command:
    """A client command line, [start, end) in the up stream."""

    start: int
    end: int
    tag: bytes
    name: bytes
    line: bytes


@dataclass(frozen=True, slots=True)
class Idling:
    """The server's continuation to IDLE ("+ idling"), [start, end) in the down stream."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class DataReply:
    """SMTP: the server's final reply to the message body (after the terminating dot), [start, end)."""

    start: int
    end: int
    code: bytes


Event = LiteralStart | Command | Idling | DataReply


@dataclass(frozen=True, slots=True)
class _Frame:
    start: int
    end: int
    line: bytes
    continued: bool  # continues a response/command after a literal
    literal: int | None  # size of the literal announced at the end of this line


class _Framer:
    """Splits one direction of an IMAP stream into lines, skipping over literals ({n}CRLF then n bytes)."""

    def __init__(self) -> None:
        self._pos = 0
        self._partial = b""
        self._partial_start = 0
        self._literal_left = 0
        self._continued = False

    def feed(self, data: bytes) -> list[_Frame]:
        frames: list[_Frame] = []
        i, n = 0, len(data)
        while i < n:
            if self._literal_left:
                take = min(self._literal_left, n - i)
                i += take
                self._literal_left -= take
                continue
            if not self._partial:
                self._partial_start = self._pos + i
            j = data.find(b"\n", i)
            if j < 0:
                self._partial += data[i:]
                break
            line, self._partial = self._partial + data[i : j + 1], b""
            i = j + 1
            match = _LITERAL.search(line)
            size = int(match.group(1)) if match else None
            frames.append(_Frame(self._partial_start, self._pos + i, line, self._continued, size))
            self._literal_left = size or 0
            self._continued = size is not None
        self._pos += n
        return frames


class _Dialogue(Protocol):
    @property
    def idling(self) -> bool: ...

    def feed(self, direction: Direction, data: bytes, start: int) -> list[Event]: ...


class _ImapDialogue:
    """What the proxy knows about one IMAP connection: FETCH literals, commands, whether it is idling."""

    def __init__(self) -> None:
        self._framers: dict[Direction, _Framer] = {"up": _Framer(), "down": _Framer()}
        self._fetch = False  # the server response being read is a FETCH
        self._fetch_literals = 0
        self._idle_tag: bytes | None = None
        self.idling = False

    def feed(self, direction: Direction, data: bytes, start: int) -> list[Event]:
        events: list[Event] = []
        for frame in self._framers[direction].feed(data):
            if direction == "up":
                events += self._client_frame(frame)
            else:
                events += self._server_frame(frame)
        return events

    def _client_frame(self, frame: _Frame) -> list[Event]:
        words = frame.line.split(None, 2)
        if frame.continued or len(words) < 2:
            return []  # literal continuation, AUTHENTICATE data, DONE
        tag, name = words[0], words[1].upper()
        if name == b"IDLE":
            self._idle_tag = tag
        return [Command(frame.start, frame.end, tag, name, frame.line)]

    def _server_frame(self, frame: _Frame) -> list[Event]:
        events: list[Event] = []
        if not frame.continued:
            self._fetch = bool(_FETCH.match(frame.line))
            if self._idle_tag is not None:
                if frame.line.startswith(b"+") and not self.idling:
                    self.idling = True
                    events.append(Idling(frame.start, frame.end))
                elif frame.line.startswith(self._idle_tag + b" "):
                    self._idle_tag, self.idling = None, False
        if frame.literal is not None and self._fetch:
            self._fetch_literals += 1
            before = frame.line[: _LITERAL.search(frame.line).start()].rstrip()  # type: ignore[union-attr]
            events.append(LiteralStart(frame.end, frame.literal, self._fetch_literals, before[-200:]))
        return events


class _SmtpDialogue:
    """What the proxy knows about one SMTP connection: where the final reply to a message body is."""

    idling = False

    def __init__(self) -> None:
        self._up = b""  # partial client line
        self._down = b""  # partial server line
        self._down_start = 0
        self._reply_start: int | None = None  # first line of a multi-line reply
        self._in_data = False
        self._tail = b""
        self._awaiting_354 = False
        self._awaiting_final = False

    def feed(self, direction: Direction, data: bytes, start: int) -> list[Event]:
        if direction == "up":
            self._client(data)
            return []
        return self._server(data, start)

    def _client(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._in_data:
                window = self._tail + data[i:]
                end = window.find(END_OF_DATA)
                if end < 0:
                    self._tail = window[-(len(END_OF_DATA) - 1) :]
                    return
                i += end + len(END_OF_DATA) - len(self._tail)
                self._in_data, self._awaiting_final, self._tail = False, True, b""
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._up += data[i:]
                return
            line, self._up = self._up + data[i : j + 1], b""
            i = j + 1
            if line.upper().startswith(b"DATA"):
                self._awaiting_354 = True

    def _server(self, data: bytes, start: int) -> list[Event]:
        events: list[Event] = []
        i = 0
        while (j := data.find(b"\n", i)) >= 0:
            if not self._down:
                self._down_start = start + i
            line, self._down = self._down + data[i : j + 1], b""
            line_start, i = self._down_start, j + 1
            if self._reply_start is None:
                self._reply_start = line_start
            if line[3:4] == b"-":
                continue  # more lines of this reply follow
            reply_start, self._reply_start = self._reply_start, None
            if self._awaiting_354:
                self._awaiting_354 = False
                self._in_data = line.startswith(b"354")
            elif self._awaiting_final:
                self._awaiting_final = False
                events.append(DataReply(reply_start, start + i, line[:3]))
        if i < len(data):
            if not self._down:
                self._down_start = start + i
            self._down += data[i:]
        return events


# --- triggers: where a fault fires ------------------------------------------------------------------------------


class _Watch(Protocol):
    def check(self, direction: Direction, start: int, end: int, events: list[Event]) -> int | None:
        """The absolute position in this chunk [start, end] where the fault fires (bytes before it are forwarded)."""


class Trigger(Protocol):
    def watch(self) -> _Watch:
        """A fresh per-connection watcher."""


@dataclass(frozen=True)
class AfterBytes:
    """After ``count`` bytes of a connection went ``direction`` (default server -> client)."""

    count: int
    direction: Direction = "down"

    def watch(self) -> _Watch:
        return _AfterBytesWatch(self)

    def __str__(self) -> str:
        return f"after {self.count} bytes {self.direction}"


@dataclass
class _AfterBytesWatch:
    spec: AfterBytes

    def check(self, direction: Direction, start: int, end: int, events: list[Event]) -> int | None:
        pos = self.spec.count
        return pos if direction == self.spec.direction and start <= pos <= end else None


@dataclass(frozen=True)
class InFetchLiteral:
    """Inside the ``n``th FETCH literal of a connection whose item ends with ``item`` (None: any literal), after
    ``at`` of its bytes went through (0.5: halfway; never past its last byte)."""

    n: int = 1
    item: bytes | None = b"BODY[]"
    at: float = 0.5

    def watch(self) -> _Watch:
        return _InLiteralWatch(self)

    def __str__(self) -> str:
        item = self.item.decode() if self.item else "any item"
        return f"inside FETCH literal {self.n} ({item}) at {self.at:.0%}"


@dataclass
class _InLiteralWatch:
    spec: InFetchLiteral
    seen: int = 0
    pending: int | None = None

    def check(self, direction: Direction, start: int, end: int, events: list[Event]) -> int | None:
        if direction != "down":
            return None
        for ev in events:
            if not isinstance(ev, LiteralStart) or self.pending is not None:
                continue
            if self.spec.item is not None and not ev.before.upper().endswith(self.spec.item.upper()):
                continue
            self.seen += 1
            if self.seen == self.spec.n:
                self.pending = ev.pos + min(int(ev.size * self.spec.at), max(ev.size - 1, 0))
        if self.pending is not None and start <= self.pending <= end:
            return self.pending
        return None


@dataclass(frozen=True)
class OnCommand:
    """When the client sends the command ``name`` (e.g. b"IDLE"; b"UID" for UID FETCH/SEARCH/STORE...) whose line
    contains ``contains`` (case ignored; e.g. b"SEARCH UID 1:*"), before it reaches the server."""

    name: bytes
    contains: bytes = b""

    def watch(self) -> _Watch:
        return _OnCommandWatch(self.name.upper(), self.contains.upper())

    def __str__(self) -> str:
        return f"when the client sends {self.name.decode()}" + (
            f" containing {self.contains.decode()!r}" if self.contains else ""
        )


@dataclass
class _OnCommandWatch:
    name: bytes
    contains: bytes

    def check(self, direction: Direction, start: int, end: int, events: list[Event]) -> int | None:
        return next(
            (
                ev.start
                for ev in events
                if isinstance(ev, Command) and ev.name == self.name and self.contains in ev.line.upper()
            ),
            None,
        )


@dataclass(frozen=True)
class OnIdling:
    """Right after the server's continuation to IDLE (``+ idling``) reached the client."""

    def watch(self) -> _Watch:
        return _OnIdlingWatch()

    def __str__(self) -> str:
        return "after the server's + idling"


class _OnIdlingWatch:
    def check(self, direction: Direction, start: int, end: int, events: list[Event]) -> int | None:
        return next((ev.end for ev in events if isinstance(ev, Idling)), None)


@dataclass(frozen=True)
class AfterDataReply:
    """SMTP: at the server's final reply to the message body (its 250 after the terminating dot). With ``forward``
    False the reply is held back by the fault (the server has the message, the client does not know it)."""

    forward: bool = False

    def watch(self) -> _Watch:
        return _AfterDataReplyWatch(self.forward)

    def __str__(self) -> str:
        return "after DATA's final reply" + (" (forwarded)" if self.forward else " (held back)")


@dataclass
class _AfterDataReplyWatch:
    forward: bool

    def check(self, direction: Direction, start: int, end: int, events: list[Event]) -> int | None:
        replies = [ev for ev in events if isinstance(ev, DataReply)]
        if not replies:
            return None
        return replies[0].end if self.forward else replies[0].start


# --- actions: what the fault does ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """Close both sides of the connection."""

    def __str__(self) -> str:
        return "drop"


@dataclass(frozen=True)
class Stall:
    """Forward nothing either way for ``seconds`` (None: for good; the connection ends when the client gives up)."""

    seconds: float | None = None

    def __str__(self) -> str:
        return "stall for good" if self.seconds is None else f"stall {self.seconds:g} s"


@dataclass(frozen=True)
class Slow:
    """From here on, forward at most ``bytes_per_second`` each way."""

    bytes_per_second: int

    def __str__(self) -> str:
        return f"slow to {self.bytes_per_second} B/s"


@dataclass(frozen=True)
class Refuse:
    """IMAP, at ``OnCommand`` only: the command is not forwarded, and the client gets ``<tag> NO <text>``, as from a
    server refusing it while the connection keeps working (Gmail's ``NO [UNAVAILABLE] Temporary System Problem``)."""

    text: bytes = b"[UNAVAILABLE] Temporary System Problem"

    def __str__(self) -> str:
        return f"refuse with NO {self.text.decode()}"


Action = Drop | Stall | Slow | Refuse


@dataclass
class ArmedFault:
    """One armed fault; ``fired`` counts how often it was injected (``times`` None: on every occasion)."""

    trigger: Trigger
    action: Action
    times: int | None = 1
    fired: int = 0

    def _take(self, lock: threading.Lock) -> bool:
        with lock:
            if self.times is not None and self.fired >= self.times:
                return False
            self.fired += 1
            return True


# --- the proxy ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inject:
    fault: ArmedFault
    where: str


_EOF = object()


@dataclass
class _Connection:
    number: int
    dialogue: _Dialogue
    watches: dict[int, tuple[ArmedFault, _Watch]] = field(default_factory=dict)
    received: dict[Direction, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    sent: dict[Direction, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    rate: int | None = None
    stalled: bool = False
    queues: dict[Direction, asyncio.Queue[object]] = field(default_factory=dict)  # what _write forwards, each way
    # the client's bytes of an unfinished line, held back while a Refuse is armed (_read; never server bytes)
    held: dict[Direction, bytes] = field(default_factory=lambda: {"up": b"", "down": b""})


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to the upstream server, injecting the armed faults. Use as a context manager."""

    def __init__(self, upstream_host: str, upstream_port: int, *, protocol: Wire = "imap") -> None:
        self._upstream = (upstream_host, upstream_port)
        self._protocol = protocol
        self._lock = threading.Lock()
        self._faults: list[ArmedFault] = []
        self._live: dict[int, _Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="fault-proxy", daemon=True)
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0  # accepted so far
        self.bytes_up = 0  # forwarded client -> server
        self.bytes_down = 0  # forwarded server -> client
        self.events: list[str] = []  # each injected fault, in order
        self.idles_started = 0  # IDLE commands the server accepted ("+ idling"), on all connections

    # --- faults ------------------------------------------------------------------------------------------------

    def arm(self, trigger: Trigger, action: Action, *, times: int | None = 1) -> ArmedFault:
        """Inject ``action`` at ``trigger`` (on any connection, open or future) ``times`` times in all."""
        fault = ArmedFault(trigger, action, times)
        with self._lock:
            self._faults.append(fault)
            for conn in self._live.values():
                conn.watches[id(fault)] = (fault, trigger.watch())
        return fault

    def disarm(self) -> None:
        """Forget every armed fault (stalls and slowdowns already injected stay)."""
        with self._lock:
            self._faults.clear()
            for conn in self._live.values():
                conn.watches.clear()

    def drop_connections(self, *, idling_only: bool = False) -> int:
        """Drop the open connections now (or only those in IDLE); returns how many."""
        assert self._loop is not None
        with self._lock:
            victims = [c for c in self._live.values() if c.dialogue.idling or not idling_only]
            for conn in victims:
                self.events.append(f"connection {conn.number}: drop now" + (" while idling" if idling_only else ""))
        for conn in victims:
            self._loop.call_soon_threadsafe(conn.abort.set)
        return len(victims)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def idling_connections(self) -> int:
        """Open IMAP connections in IDLE (the server's continuation seen, the IDLE not yet ended)."""
        with self._lock:
            return sum(c.dialogue.idling for c in self._live.values())

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10) or self._failure is not None:
            raise RuntimeError(f"fault proxy did not start: {self._failure!r}")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__ when it happens before ready
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await self._handle(reader, writer)
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(accept, self.host, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            with self._lock:
                live = list(self._live.values())
            for conn in live:  # ended through their abort event: asyncio logs an error for a cancelled handler
                conn.abort.set()
            if handlers:
                await asyncio.wait(handlers, timeout=5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)

    # --- one connection ----------------------------------------------------------------------------------------

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        dialogue: _Dialogue = _ImapDialogue() if self._protocol == "imap" else _SmtpDialogue()
        with self._lock:
            self.connections += 1
            conn = _Connection(self.connections, dialogue)
            conn.flowing.set()
            conn.watches = {id(f): (f, f.trigger.watch()) for f in self._faults}
            self._live[conn.number] = conn
        server_writer: asyncio.StreamWriter | None = None
        tasks: list[asyncio.Task[object]] = []
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                return
            up: asyncio.Queue[object] = asyncio.Queue()
            down: asyncio.Queue[object] = asyncio.Queue()
            conn.queues = {"up": up, "down": down}
            tasks = [
                asyncio.create_task(self._read(conn, "up", client_reader, up)),
                asyncio.create_task(self._read(conn, "down", server_reader, down)),
            ]
            # the connection ends when either side's stream ended and was flushed, on a drop, or on abort
            enders = [
                asyncio.create_task(self._write(conn, "up", up, server_writer)),
                asyncio.create_task(self._write(conn, "down", down, client_writer)),
                asyncio.create_task(conn.abort.wait()),
            ]
            tasks += enders
            await asyncio.wait(enders, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await writer.wait_closed()
            with self._lock:
                self._live.pop(conn.number, None)

    async def _read(
        self, conn: _Connection, direction: Direction, reader: asyncio.StreamReader, queue: asyncio.Queue[object]
    ) -> None:
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                data = b""
            if not data:
                if conn.held[direction]:
                    queue.put_nowait(conn.held[direction])
                queue.put_nowait(_EOF)
                if direction == "up" and conn.stalled:
                    conn.abort.set()  # the client gave up on a stalled connection: nothing left to forward
                return
            start = conn.received[direction]
            end = start + len(data)
            conn.received[direction] = end
            events = conn.dialogue.feed(direction, data, start)
            if any(isinstance(ev, Idling) for ev in events):
                with self._lock:
                    self.idles_started += 1
            # the client's bytes of an unfinished line held back (only while a Refuse is armed), then this chunk
            data, start = conn.held[direction] + data, start - len(conn.held[direction])
            offset = 0
            for pos, fault in self._fire_points(conn, direction, start, end, events):
                if pos - start > offset:
                    queue.put_nowait(data[offset : pos - start])
                    offset = pos - start
                if isinstance(fault.action, Refuse):
                    offset = self._refuse(conn, fault, pos, start, events)
                    continue
                queue.put_nowait(_Inject(fault, f"{direction} stream byte {pos}"))
            # imaplib sends a command and its CRLF in two writes: a command to refuse must not reach the server in
            # part, so while a Refuse is armed the client's bytes go on only up to the end of their last line
            cut = len(data)
            if direction == "up" and self._refusing(conn):
                cut = max(offset, data.rfind(b"\n") + 1)
            if offset < cut:
                queue.put_nowait(data[offset:cut])
            conn.held[direction] = data[max(offset, cut) :]

    def _refusing(self, conn: _Connection) -> bool:
        with self._lock:
            return any(
                isinstance(f.action, Refuse) and (f.times is None or f.fired < f.times)
                for f, _ in conn.watches.values()
            )

    def _refuse(self, conn: _Connection, fault: ArmedFault, pos: int, start: int, events: list[Event]) -> int:
        """Swallow the command at ``pos`` and answer it with a tagged NO; returns the offset in ``data`` (from
        ``start``) after it."""
        assert isinstance(fault.action, Refuse)
        command = next((ev for ev in events if isinstance(ev, Command) and ev.start == pos), None)
        if command is None or command.start < start:
            raise RuntimeError("Refuse needs OnCommand (and the command must not have gone on in part)")
        with self._lock:
            self.events.append(f"connection {conn.number}: {fault.action} {fault.trigger} (up stream byte {pos})")
        conn.queues["down"].put_nowait(command.tag + b" NO " + fault.action.text + b"\r\n")
        return command.end - start

    def _fire_points(
        self, conn: _Connection, direction: Direction, start: int, end: int, events: list[Event]
    ) -> Iterator[tuple[int, ArmedFault]]:
        with self._lock:
            watches = list(conn.watches.values())
        points = []
        for fault, watch in watches:
            pos = watch.check(direction, start, end, events)
            if pos is not None and fault._take(self._lock):
                points.append((pos, fault))
        return iter(sorted(points, key=lambda p: p[0]))

    async def _write(
        self, conn: _Connection, direction: Direction, queue: asyncio.Queue[object], writer: asyncio.StreamWriter
    ) -> None:
        try:
            while (item := await queue.get()) is not _EOF:
                if isinstance(item, _Inject):
                    with self._lock:
                        self.events.append(
                            f"connection {conn.number}: {item.fault.action} {item.fault.trigger} ({item.where})"
                        )
                    if isinstance(item.fault.action, Drop):
                        return
                    self._apply(conn, item.fault.action)
                    continue
                assert isinstance(item, bytes)
                await self._forward(conn, direction, item, writer)
        except OSError:  # the other end is gone (reset, broken pipe, transport closed)
            return

    def _apply(self, conn: _Connection, action: Stall | Slow) -> None:
        if isinstance(action, Slow):
            conn.rate = action.bytes_per_second
            return
        conn.stalled = True
        conn.flowing.clear()
        if action.seconds is not None:

            def resume() -> None:
                conn.stalled = False
                conn.flowing.set()

            asyncio.get_running_loop().call_later(action.seconds, resume)

    async def _forward(
        self, conn: _Connection, direction: Direction, data: bytes, writer: asyncio.StreamWriter
    ) -> None:
        view = memoryview(data)
        while view:
            await conn.flowing.wait()
            piece = view if conn.rate is None else view[: max(1, conn.rate // 20)]
            writer.write(piece)
            await writer.drain()
            conn.sent[direction] += len(piece)
            with self._lock:
                if direction == "up":
                    self.bytes_up += len(piece)
                else:
                    self.bytes_down += len(piece)
            if conn.rate is not None:
                await asyncio.sleep(len(piece) / conn.rate)
            view = view[len(piece) :]
