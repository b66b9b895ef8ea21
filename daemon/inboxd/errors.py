"""The one error hierarchy of inboxd, grouped by what the caller can do about it.

Adapters translate library errors into these with ``raise ... from exc``; nothing above the adapters
catches a library exception directly.
"""

from __future__ import annotations


class InboxdError(Exception):
    """Something inboxd could not do."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(InboxdError):
    """The configuration is invalid; the command exits 2 and the message names file, key and problem."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        where = ": ".join(p for p in (path, key) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.key = key


class UsageError(InboxdError):
    """A CLI argument or a stored object the operator named is wrong; the command exits 2."""


class SecretsError(InboxdError):
    """The secrets key is missing, unreadable or does not decrypt the stored credentials."""


class RetryLater(InboxdError):
    """A transient failure (network, server busy, 5xx): try this account again later."""


class ReauthRequired(InboxdError):
    """The credentials were refused for good (revoked/expired refresh token, bad password): a human must reconnect."""


class AccountFailed(InboxdError):
    """The account cannot be synced until an admin acts (IMAP disabled, mailbox missing, ...)."""


class SkipMessage(InboxdError):
    """This one message cannot be processed; record it and carry on with the rest."""


class UnparseableMessage(SkipMessage):
    """The message bytes cannot be parsed at all; it goes to quarantine with this reason."""


class SessionExpired(RetryLater):
    """The server ended a healthy session (Gmail's `BYE Session expired`): reconnect at once, not an account failure."""


class QuotaExceeded(RetryLater):
    """The provider's bandwidth or command quota is used up (Gmail [OVERQUOTA]): leave this account alone a while."""


class Interrupted(InboxdError):
    """The daemon is stopping: what was done is committed, the rest waits for the next start."""


class ConnectFailed(InboxdError):
    """The consent flow gave no usable grant (denied, another account signed in, link expired): the person must
    start again. ``code`` is a stable word the HR app can map to its own text."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code
