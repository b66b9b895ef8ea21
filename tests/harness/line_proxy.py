"""A loopback proxy to an IMAP server's plain port that rewrites the server's reply lines, to play a server that
lacks something the test stack's Dovecot has (IDLE, SPECIAL-USE attributes): 127.0.0.1:``port`` forwards to
``upstream``; each whole line from the server goes through ``rewrite`` (a line split over two reads is joined
first), what the client sends goes as it is. Counts the connections; ``drop()`` closes the open ones, as a lost
network would."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType

from harness.loopback_server import LoopbackServer


class LineRewritingProxy(LoopbackServer):
    def __init__(self, upstream_host: str, upstream_port: int, rewrite: Callable[[bytes], bytes]) -> None:
        super().__init__("line-rewriting-proxy")
        self._upstream = (upstream_host, upstream_port)
        self._rewrite = rewrite
        self.connections = 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        self.drop()

    def drop(self) -> None:
        with self._lock:
            victims, self._open = self._open, []
        for sock in victims:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def handle(self, conn: socket.socket) -> None:
        server = socket.create_connection(self._upstream, timeout=10)
        server.settimeout(None)
        with self._lock:
            self.connections += 1
            self._open += [conn, server]
        threading.Thread(target=self._forward, args=(conn, server, False), daemon=True).start()
        threading.Thread(target=self._forward, args=(server, conn, True), daemon=True).start()

    def _forward(self, source: socket.socket, target: socket.socket, from_server: bool) -> None:
        partial = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not from_server:
                    target.sendall(data)
                    continue
                buffered = partial + data
                end = buffered.rfind(b"\n") + 1
                partial = buffered[end:]
                if end:
                    lines = buffered[:end].splitlines(keepends=True)
                    target.sendall(b"".join(self._rewrite(line) for line in lines))
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
