"""A scripted IMAP server on loopback for the odd replies no real server here gives: a greeting without STARTTLS, a
STATUS that leaves a value out, Exchange Online's "User is authenticated but not connected", a peer that hangs up in
the TLS handshake. Plain text (no TLS); one thread per connection; each tagged command is answered by ``answer``:
its name (upper case) and arguments -> the lines to send, ``{tag}`` standing for the command's tag. LOGIN succeeds
unless ``answer`` says otherwise, LOGOUT says BYE."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from harness.loopback_server import LoopbackServer

Answer = Callable[[str, str], list[str] | None]  # (command, arguments) -> lines, or None for the default

GREETING = "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] scripted server ready"


class ScriptedImap(LoopbackServer):
    def __init__(self, answer: Answer, *, greeting: str = GREETING, hang_up: bool = False) -> None:
        """``hang_up``: close every connection once the client has sent its first bytes, without a word (a TLS peer
        gone in the middle of the handshake)."""
        super().__init__("scripted-imap")
        self._answer = answer
        self._greeting = greeting
        self._hang_up = hang_up
        self.commands: list[str] = []  # the names of the tagged commands received, in order

    def handle(self, conn: socket.socket) -> None:
        if self._hang_up:  # after the client's first flight (its TLS ClientHello): an EOF, not a reset
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                conn.recv(65536)
            return
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError), conn.makefile("rb") as lines:
            conn.sendall(f"{self._greeting}\r\n".encode())
            for raw in lines:
                tag, _, rest = raw.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
                command, _, args = rest.partition(" ")
                command = command.upper()
                if command == "UID":
                    sub, _, args = args.partition(" ")
                    command = f"UID {sub.upper()}"
                self.commands.append(command)
                reply = self._answer(command, args)
                if reply is None:
                    reply = self._default(command)
                conn.sendall("".join(f"{line.format(tag=tag)}\r\n" for line in reply).encode())
                if command == "LOGOUT":
                    return

    @staticmethod
    def _default(command: str) -> list[str]:
        if command == "LOGIN":
            return ["{tag} OK [CAPABILITY IMAP4rev1] logged in"]
        if command == "CAPABILITY":
            return ["* CAPABILITY IMAP4rev1", "{tag} OK done"]
        if command == "LOGOUT":
            return ["* BYE bye", "{tag} OK done"]
        return ["{tag} BAD unknown command"]
