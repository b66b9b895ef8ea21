"""sd_notify for `inboxd run` under a systemd Type=notify unit: READY, STATUS, WATCHDOG and STOPPING.

No dependency for this: the protocol is one datagram of newline-separated KEY=VALUE lines sent to the AF_UNIX
socket named by $NOTIFY_SOCKET, which the stdlib `socket` module does in a few lines.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None when the watchdog is off or meant for another
    process ($WATCHDOG_PID names the process the manager watches; unset means this one)."""
    env = os.environ if environ is None else environ
    me = os.getpid() if pid is None else pid
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        watched = int(env["WATCHDOG_PID"]) if env.get("WATCHDOG_PID") else me
    except ValueError:
        return None
    if usec <= 0 or watched != me:
        return None
    return usec / 1_000_000


def _address(value: str) -> str | None:
    if value.startswith("@"):  # abstract namespace: a leading NUL byte instead of a path
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # "vsock:..." and relative paths: not for a service on this host


class Notifier:
    """Sends notifications to the service manager; without $NOTIFY_SOCKET (a shell, a test) every call is a
    no-op. Never raises: the daemon must not stop because systemd's socket is gone or full."""

    def __init__(
        self,
        notify_socket: str | None,
        watchdog: float | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = _address(notify_socket) if notify_socket else None
        self._warned = False
        if notify_socket and self._address is None:
            self._warn("sdnotify.unsupported_socket", socket=notify_socket)
        self.watchdog_interval = watchdog if self._address else None
        self._monotonic = monotonic
        self._last_ping: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send KEY=VALUE lines as one datagram; False when nothing was delivered."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # MSG_DONTWAIT: a full receive queue drops the datagram instead of blocking the sync loop.
                sock.sendto(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
        except OSError as exc:
            self._warn("sdnotify.send_failed", error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        """Ping the watchdog; callable as often as convenient (from several threads): pings closer together than a
        quarter of the interval are skipped."""
        if self.watchdog_interval is None:
            return False
        now = self._monotonic()
        if self._last_ping is not None and now - self._last_ping < self.watchdog_interval / 4:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")

    def _warn(self, event: str, **fields: str) -> None:
        if not self._warned:  # once: a broken socket would otherwise log on every ping
            self._warned = True
            log.warning(event, **fields)
