"""The `state` of the HTTP connect flow: who is being connected, where the browser goes back to, and the PKCE
verifier, sealed (encrypted and authenticated, Fernet) with a key derived from the secrets key, and expiring.

Nothing is kept server-side, so any node sharing the database and key file can finish a flow another node began.
The key is derived again for each seal and open (`SecretBox.derived` re-reads a key file that changed): after
`secrets rotate` and `secrets prune`, every node seals and opens with the same keys without a restart.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from inboxd.clock import Clock
from inboxd.errors import ConnectFailed

STATE_LIFETIME = timedelta(minutes=15)  # time to pick an account and click Allow


@dataclass(frozen=True, slots=True)
class ConnectState:
    email: str
    provider: str
    return_to: str
    verifier: str
    hr_user_ref: str | None = None
    nonce: str = ""

    def __repr__(self) -> str:
        return f"ConnectState(email={self.email!r}, provider={self.provider!r}, return_to={self.return_to!r})"


Keys = Fernet | MultiFernet


class StateCodec:
    """Seals and opens ConnectState; ``keys`` is a fixed key or a function giving the current one (called at each
    seal and open, so that it follows the key file)."""

    def __init__(self, keys: Keys | Callable[[], Keys], *, clock: Clock, lifetime: timedelta = STATE_LIFETIME) -> None:
        self._keys = keys
        self._clock = clock
        self._lifetime = lifetime

    @property
    def _fernet(self) -> Keys:
        return self._keys if isinstance(self._keys, Fernet | MultiFernet) else self._keys()

    def seal(self, state: ConnectState) -> str:
        fields = asdict(state) | {"nonce": secrets.token_urlsafe(8)}
        data = json.dumps(fields, separators=(",", ":")).encode()
        return self._fernet.encrypt_at_time(data, int(self._clock.now().timestamp())).decode("ascii")

    def open(self, sealed: str) -> ConnectState:
        """The state, or ConnectFailed("expired") for a stale, forged or garbled one (they look alike on purpose)."""
        try:
            data = self._fernet.decrypt_at_time(
                sealed.encode("ascii"), int(self._lifetime.total_seconds()), int(self._clock.now().timestamp())
            )
            return ConnectState(**json.loads(data))
        except (InvalidToken, UnicodeEncodeError, ValueError, TypeError):
            raise ConnectFailed(
                "this connect link has expired or is not valid: start again from the HR app", code="expired"
            ) from None
