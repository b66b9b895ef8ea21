"""A sync's IMAP session, kept open for the account's next sync for a while (`[sync] keep_session`).

A new session costs a TCP and TLS handshake, the XOAUTH2 login, CAPABILITY, ID, ENABLE and a LOGOUT: about 17 ms on
loopback, several round trips to a remote server. Syncs come in bursts: pushes for a conversation, a cycle for
every account when the HR app adds a candidate, retries. A session kept a few minutes makes such a sync a LIST and
a STATUS per folder on a warm connection.

A kept session is idle in the authenticated state (no mailbox selected, so the server sends nothing unasked). It is
used by one sync at a time (taken out, put back), closed with LOGOUT once older than the keep time, when its
account stops syncing here (paused, disabled, lease lost), and when the daemon stops. One the server dropped
meanwhile is noticed by the sync that takes it, which reconnects once, silently (inboxd.runner).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from inboxd.clock import Clock
from inboxd.config import ProviderConfig
from inboxd.errors import InboxdError
from inboxd.imap import ImapSession

log = structlog.get_logger(__name__)


def still_fresh(kept_at: datetime, now: datetime, keep: timedelta) -> bool:
    """Whether a session put back at ``kept_at`` may serve a sync at ``now`` (a clock that went back: no)."""
    return kept_at <= now < kept_at + keep


@dataclass(frozen=True, slots=True)
class _Kept:
    session: ImapSession
    provider: ProviderConfig  # a reloaded config that changed the server: the session is for the old one
    kept_at: datetime


class KeptSessions:
    """At most one kept session per account id, with the provider it is for and when it was put back."""

    def __init__(self, *, clock: Clock, keep: timedelta) -> None:
        self._clock = clock
        self._keep = keep
        self._lock = threading.Lock()
        self._kept: dict[int, _Kept] = {}

    def reconfigure(self, keep: timedelta) -> None:
        with self._lock:
            self._keep = keep

    def take(self, account_id: int, provider: ProviderConfig) -> ImapSession | None:
        """The account's kept session, if it is fresh and for this provider's server; it is the caller's now."""
        with self._lock:
            kept = self._kept.pop(account_id, None)
            keep = self._keep
        if kept is None:
            return None
        if kept.provider != provider:
            _close(kept.session, account_id, "provider changed")
            return None
        if not still_fresh(kept.kept_at, self._clock.now(), keep):
            _close(kept.session, account_id, "expired")
            return None
        return kept.session

    def put(self, account_id: int, provider: ProviderConfig, session: ImapSession) -> None:
        """Keep a session that just finished a sync (closed at once when keeping is off)."""
        if self._keep <= timedelta(0):
            session.close()
            return
        try:
            session.park()
        except InboxdError as exc:  # the connection failed: not worth keeping
            log.info("sync.session_not_kept", account_id=account_id, error_kind=type(exc).__name__)
            session.close()
            return
        with self._lock:
            previous = self._kept.pop(account_id, None)
            self._kept[account_id] = _Kept(session, provider, self._clock.now())
        if previous is not None:  # two syncs of one account ran at once: keep one session
            _close(previous.session, account_id, "replaced")

    def expire(self) -> int:
        """Close the sessions kept longer than the keep time; how many."""
        now = self._clock.now()
        with self._lock:
            old = [a for a, k in self._kept.items() if not still_fresh(k.kept_at, now, self._keep)]
            gone = [(a, self._kept.pop(a)) for a in old]
        for account_id, kept in gone:
            _close(kept.session, account_id, "expired")
        return len(gone)

    def retain(self, account_ids: set[int]) -> None:
        """Close the sessions of accounts not in ``account_ids`` (paused, disabled, deleted, another node's)."""
        with self._lock:
            gone = [(a, self._kept.pop(a)) for a in list(self._kept) if a not in account_ids]
        for account_id, kept in gone:
            _close(kept.session, account_id, "account not synced here")

    def drop(self, account_id: int) -> None:
        with self._lock:
            kept = self._kept.pop(account_id, None)
        if kept is not None:
            _close(kept.session, account_id, "account not synced here")

    def close_all(self) -> None:
        with self._lock:
            gone, self._kept = list(self._kept.items()), {}
        for account_id, kept in gone:
            _close(kept.session, account_id, "stopping")

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)


def _close(session: ImapSession, account_id: int, why: str) -> None:
    session.close()  # LOGOUT; a connection already gone is shut down quietly
    log.debug("sync.session_closed", account_id=account_id, reason=why)
