"""Credentials to connections: one token source per account (refreshed once per expiry, shared by IMAP and SMTP),
an authenticated IMAP session, an SMTP sender. Used by the sync runner and the outbox alike."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

from inboxd.clock import Clock
from inboxd.config import ProviderConfig
from inboxd.errors import AccountFailed
from inboxd.imap import ImapEndpoint, ImapSession, connect
from inboxd.metrics import Metrics
from inboxd.smtp import AioSmtpSender, SmtpEndpoint, SmtpSender
from inboxd.store import Account, Store
from inboxd.tokens import OAuthRefreshTokenSource, TokenSource


class Connections:
    def __init__(
        self,
        store: Store,
        *,
        clock: Clock,
        sleep: Callable[[float], None] = time.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._sleep = sleep  # per-command IMAP backoff ([THROTTLED]); tests record instead of sleeping
        # keyed by account and a digest of its refresh token: reconnecting (new token) gets a new source
        self._tokens: dict[tuple[int, str], TokenSource] = {}
        self._lock = threading.Lock()

    def imap(self, account: Account, provider: ProviderConfig) -> ImapSession:
        endpoint = ImapEndpoint(
            host=provider.imap_host,
            port=provider.imap_port,
            tls=provider.imap_tls,
            ca_file=provider.ca_file,
            timeout=provider.timeout,
        )
        credential = self._store.credential(account.id)
        if credential.kind == "password":
            session = connect(endpoint, username=account.email, password=credential.secret, sleep=self._sleep)
        else:
            tokens = self.token_source(account, provider, credential.secret)
            session = connect(
                endpoint,
                username=account.email,
                access_token=tokens.access_token,
                invalidate_token=tokens.invalidate,
                sleep=self._sleep,
            )
        self._metrics.imap_connected()
        return session

    def smtp(self, account: Account, provider: ProviderConfig) -> SmtpSender:
        try:
            endpoint = SmtpEndpoint.from_provider(provider)
        except ValueError as exc:
            raise AccountFailed(f"provider {provider.name!r} has no SMTP server configured (smtp_host)") from exc
        credential = self._store.credential(account.id)
        if credential.kind == "password":
            return AioSmtpSender(endpoint, username=account.email, password=credential.secret)
        tokens = self.token_source(account, provider, credential.secret)
        return AioSmtpSender(
            endpoint, username=account.email, access_token=tokens.access_token, invalidate_token=tokens.invalidate
        )

    def token_source(self, account: Account, provider: ProviderConfig, refresh_token: str) -> TokenSource:
        with self._lock:
            key = (account.id, hashlib.sha256(refresh_token.encode()).hexdigest())
            source = self._tokens.get(key)
            if source is None:
                if not (provider.token_uri and provider.client_id and provider.client_secret):
                    raise AccountFailed(f"provider {provider.name!r} lacks token_uri/client_id/client_secret")
                source = OAuthRefreshTokenSource(
                    refresh_token=refresh_token,
                    client_id=provider.client_id,
                    client_secret=provider.client_secret,
                    token_uri=provider.token_uri,
                    clock=self._clock,
                    ca_file=provider.ca_file,
                    timeout=provider.timeout,
                    on_rotated_refresh_token=lambda new: self._store.replace_refresh_token(account.id, new),
                    on_refresh=self._metrics.token_refreshed,
                )
                self._tokens = {k: v for k, v in self._tokens.items() if k[0] != account.id}
                self._tokens[key] = source
            return source
