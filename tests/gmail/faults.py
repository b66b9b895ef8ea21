"""Injected failures and per-user counters of the Gmail test server; tests flip them through ``GmailServer``.

Each fault names a user, or ``None`` for everyone; all methods are thread-safe.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field


def _key(user: str | None) -> str | None:
    return user.strip().lower() if user else None


@dataclass
class Faults:
    _lock: threading.Lock = field(default_factory=threading.Lock)
    throttled: dict[str | None, int] = field(default_factory=dict)  # user -> tagged OKs left to mark [THROTTLED]
    overquota: set[str | None] = field(default_factory=set)
    bye: dict[str | None, int] = field(default_factory=dict)  # user -> commands left before "* BYE"
    connection_limit: dict[str | None, int] = field(default_factory=dict)
    imap_disabled: set[str | None] = field(default_factory=set)
    raw_folder_names: set[str | None] = field(default_factory=set)  # LIST names as raw UTF-8, not modified UTF-7
    daily_limit: set[str | None] = field(default_factory=set)
    # X-GM-MSGIDs whose FETCH replies come without the body (a message the server cannot read at the moment: the
    # reply carries the other items, the command ends OK)
    bodiless: set[int] = field(default_factory=set)
    # X-GM-MSGIDs Gmail cannot serve at all: a FETCH naming one sends the others' replies, none for it, and ends NO
    unfetchable: set[int] = field(default_factory=set)
    login_unavailable: int = 0  # logins left to answer NO [UNAVAILABLE] Temporary System Problem
    login_bye: int = 0  # logins left to answer with * BYE and a closed connection
    temp_fail: int = 0
    drop_after_data: int = 0

    def set_throttle(self, n: int, user: str | None) -> None:
        with self._lock:
            self.throttled[_key(user)] = n

    def take_throttle(self, user: str | None) -> bool:
        """True if this tagged OK must carry [THROTTLED] (consumes one)."""
        with self._lock:
            for key in (_key(user), None) if user else (None,):
                if self.throttled.get(key, 0) > 0:
                    self.throttled[key] -= 1
                    return True
            return False

    def set_flag(self, which: set[str | None], user: str | None, on: bool) -> None:
        with self._lock:
            (which.add if on else which.discard)(_key(user))

    def withhold_body(self, gm_msgid: int, on: bool) -> None:
        with self._lock:
            (self.bodiless.add if on else self.bodiless.discard)(gm_msgid)

    def body_withheld(self, gm_msgid: int) -> bool:
        with self._lock:
            return gm_msgid in self.bodiless

    def has(self, which: set[str | None], user: str | None) -> bool:
        with self._lock:
            return None in which or (user is not None and _key(user) in which)

    def set_bye(self, n: int, user: str | None) -> None:
        with self._lock:
            self.bye[_key(user)] = n

    def bye_due(self, user: str | None) -> bool:
        """Called after each completed command: True once the countdown for this user (or everyone) hits 0."""
        with self._lock:
            for key in (_key(user), None) if user else (None,):
                if key in self.bye:
                    self.bye[key] -= 1
                    if self.bye[key] <= 0:
                        del self.bye[key]
                        return True
            return False

    def set_connection_limit(self, limit: int | None, user: str | None) -> None:
        with self._lock:
            if limit is None:
                self.connection_limit.pop(_key(user), None)
            else:
                self.connection_limit[_key(user)] = limit

    def limit_for(self, user: str) -> int | None:
        with self._lock:
            return self.connection_limit.get(_key(user), self.connection_limit.get(None))

    def take_count(self, name: str) -> bool:
        """Consume one of a counted fault (``temp_fail``, ``drop_after_data``, ``login_unavailable``, ``login_bye``)."""
        with self._lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False

    def clear(self) -> None:
        with self._lock:
            self.throttled.clear()
            self.overquota.clear()
            self.bye.clear()
            self.connection_limit.clear()
            self.imap_disabled.clear()
            self.raw_folder_names.clear()
            self.daily_limit.clear()
            self.bodiless.clear()
            self.unfetchable.clear()
            self.temp_fail = self.drop_after_data = self.login_unavailable = self.login_bye = 0


@dataclass
class Counters:
    """What clients did, per user: IMAP command names, message bytes sent, authenticated connections open."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    commands: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    body_bytes: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    connections: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    smtp_sent: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def command(self, user: str, name: str) -> None:
        with self._lock:
            self.commands[user].append(name)

    def sent_bytes(self, user: str, n: int) -> None:
        with self._lock:
            self.body_bytes[user] += n

    def smtp_message(self, user: str, gm_msgid: int) -> None:
        with self._lock:
            self.smtp_sent[user].append(gm_msgid)

    def try_connect(self, user: str, limit: int | None) -> bool:
        """Count an authenticated session unless ``limit`` sessions are already open."""
        with self._lock:
            if limit is not None and self.connections[user] >= limit:
                return False
            self.connections[user] += 1
            return True

    def disconnect(self, user: str) -> None:
        with self._lock:
            self.connections[user] -= 1
