"""A TCP server on a free loopback port for the tests' small stand-in servers (harness.line_proxy,
harness.scripted_imap): a thread accepts connections and hands each to ``handle``; leaving the ``with`` block
stops it."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self


class LoopbackServer:
    def __init__(self, name: str) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not, on Linux)
        self._listener.close()
        self._thread.join(5)

    def handle(self, conn: socket.socket) -> None:
        """Serve one accepted connection (in the accept thread: start a thread for anything long)."""
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.handle(conn)
