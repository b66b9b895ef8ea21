"""A loopback TCP proxy in front of an SMTP server that injects faults at exact points of the SMTP dialogue.

It reads the plaintext dialogue, so it only works for plain SMTP (``tls="plain"`` to loopback; the test Postfix
allows AUTH without TLS): after STARTTLS the bytes are opaque. Runs on the test's own event loop:

    async with SmtpFaultProxy(mailstack.host, mailstack.submission_port) as proxy:
        proxy.cut_after_data_reply()
        ... connect a client to 127.0.0.1:proxy.port ...
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Fault = Literal["none", "cut_after_data_reply", "stall_after_data", "close_at_data", "stop_reading_data"]
END_OF_DATA = b"\r\n.\r\n"


@dataclass
class _Dialogue:
    """What the proxy knows about one connection's SMTP state."""

    in_data: bool = False  # client is sending the message body
    awaiting_354: bool = False
    awaiting_final: bool = False  # the body's terminating dot went out; the next reply is the final one
    tail: bytes = b""  # last bytes of the body, to find the terminating dot across reads
    client_buffer: bytes = b""
    server_buffer: bytes = b""
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class SmtpFaultProxy:
    """Forwards everything, except at the point the armed fault names. ``events`` records what was injected."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._fault: Fault = "none"
        self._answers: dict[bytes, bytes] = {}
        self.events: list[str] = []
        self.port = 0

    # --- faults ------------------------------------------------------------------------------------
    def cut_after_data_reply(self) -> None:
        """Swallow the server's final reply to the message (after the terminating dot) and close the client
        connection: the server HAS accepted the message, the client never learns it."""
        self._fault = "cut_after_data_reply"

    def stall_after_data(self) -> None:
        """Swallow the final reply to the message and keep the connection open: the client times out."""
        self._fault = "stall_after_data"

    def stop_reading_data(self) -> None:
        """Stop reading from the client once the message body has begun (after the 354), keeping the connection
        open: a big message fills the socket buffers and the client's writes stop moving."""
        self._fault = "stop_reading_data"

    def close_at_data(self) -> None:
        """Close the client connection when it sends DATA, before any 354: the server never saw DATA."""
        self._fault = "close_at_data"

    def answer(self, command: bytes, reply: bytes) -> None:
        """Answer client lines starting with ``command`` (case-insensitive) with ``reply`` instead of forwarding
        them, e.g. ``answer(b"MAIL FROM", b"550 5.4.5 Daily user sending limit exceeded")``."""
        self._answers[command.upper()] = reply.rstrip(b"\r\n") + b"\r\n"

    # --- lifecycle -----------------------------------------------------------------------------------
    async def __aenter__(self) -> SmtpFaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    # --- plumbing ------------------------------------------------------------------------------------
    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        server_writer: asyncio.StreamWriter | None = None
        try:
            server_reader, server_writer = await asyncio.open_connection(*self._upstream)
            state = _Dialogue()
            pumps = [
                asyncio.create_task(self._client_to_server(state, client_reader, client_writer, server_writer)),
                asyncio.create_task(self._server_to_client(state, server_reader, client_writer)),
                asyncio.create_task(state.closed.wait()),
            ]
            try:  # either side ending, or a fault, ends the connection on both sides
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await writer.wait_closed()
            self._handlers.discard(task)

    async def _client_to_server(
        self,
        state: _Dialogue,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        server: asyncio.StreamWriter,
    ) -> None:
        while data := await reader.read(65536):
            if state.in_data and self._fault == "stop_reading_data":
                self.events.append("stopped reading the message")
                await state.closed.wait()  # read nothing more until the connection ends
                return
            if state.in_data:
                window = state.tail + data
                if END_OF_DATA in window:
                    state.in_data, state.awaiting_final, state.tail = False, True, b""
                else:
                    state.tail = window[-(len(END_OF_DATA) - 1) :]
                server.write(data)
                await server.drain()
                continue
            state.client_buffer += data
            while b"\n" in state.client_buffer:
                line, _, state.client_buffer = state.client_buffer.partition(b"\n")
                line += b"\n"
                upper = line.upper()
                answer = next((reply for cmd, reply in self._answers.items() if upper.startswith(cmd)), None)
                if answer is not None:
                    self.events.append(f"answered {line.split()[0].decode()} with {answer.split()[0].decode()}")
                    client.write(answer)
                    await client.drain()
                    continue
                if upper.startswith(b"DATA"):
                    if self._fault == "close_at_data":
                        self.events.append("closed at DATA")
                        state.closed.set()
                        return
                    state.awaiting_354 = True
                server.write(line)
                await server.drain()

    async def _server_to_client(
        self, state: _Dialogue, reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            state.server_buffer += data
            while b"\n" in state.server_buffer:
                line, _, state.server_buffer = state.server_buffer.partition(b"\n")
                line += b"\n"
                final_line = line[3:4] != b"-"
                if state.awaiting_354 and final_line:
                    state.awaiting_354 = False
                    state.in_data = line.startswith(b"354")
                elif state.awaiting_final and final_line:
                    state.awaiting_final = False
                    if self._fault == "cut_after_data_reply":
                        self.events.append(f"cut after final reply {line[:3].decode()}")
                        state.closed.set()
                        return
                    if self._fault == "stall_after_data":
                        self.events.append(f"swallowed final reply {line[:3].decode()}")
                        continue
                client.write(line)
            await client.drain()
