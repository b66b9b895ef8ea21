"""Credentials to connections: one token source per account (refreshed once per expiry, shared by IMAP and SMTP),
an authenticated IMAP session, an SMTP sender. Used by the sync runner and the outbox alike."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from inboxd.clock import Clock
from inboxd.config import ProviderConfig
from inboxd.delegation import ClientCredentialsTokenSource, ServiceAccountTokenSource
from inboxd.errors import AccountFailed
from inboxd.imap import ImapEndpoint, ImapSession, connect
from inboxd.metrics import Metrics
from inboxd.oauth_flow import IDENTITY_SCOPES
from inboxd.smtp import AioSmtpSender, SmtpEndpoint, SmtpSender
from inboxd.store import DELEGATED, Account, Credential, Store
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
        # per account: the source and what it was built from (credential kind, the provider's token settings)
        self._tokens: dict[int, tuple[_SourceKey, TokenSource]] = {}
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
            tokens = self.token_source(account, provider, credential)
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
        tokens = self.token_source(account, provider, credential)
        return AioSmtpSender(
            endpoint, username=account.email, access_token=tokens.access_token, invalidate_token=tokens.invalidate
        )

    def token_source(self, account: Account, provider: ProviderConfig, credential: Credential) -> TokenSource:
        """The account's one token source (so one refresh at a time, and one per expiry however many connections
        open), replaced when the provider's token settings change (a config reload) or the mailbox was reconnected.

        A refresh token the provider rotated (Microsoft, on every refresh) is no reason for a new source: the source
        reads the stored token at each refresh anyway. A stored token the source never held was written by a
        reconnect (or by another node's rotation: then the new source costs one refresh): a new source drops the
        access token of the old grant."""
        key = (credential.kind, token_settings(provider))
        with self._lock:
            cached = self._tokens.get(account.id)
            if cached is not None and cached[0] == key and _still_current(cached[1], credential):
                return cached[1]
            source = self._new_source(account, provider, credential)
            self._tokens[account.id] = (key, source)
            return source

    def _new_source(self, account: Account, provider: ProviderConfig, credential: Credential) -> TokenSource:
        if credential.kind == DELEGATED:
            return delegated_token_source(
                account.email, provider, clock=self._clock, on_refresh=self._metrics.token_refreshed
            )
        if not (provider.token_uri and provider.client_id and provider.client_secret):
            raise AccountFailed(f"provider {provider.name!r} lacks token_uri/client_id/client_secret")
        return OAuthRefreshTokenSource(
            refresh_token=credential.secret,
            client_id=provider.client_id,
            client_secret=provider.client_secret,
            token_uri=provider.token_uri,
            clock=self._clock,
            ca_file=provider.ca_file,
            timeout=provider.timeout,
            on_refresh=self._metrics.token_refreshed,
            vault=lambda: self._store.refresh_slot(account.id),
        )


_SourceKey = tuple[str, tuple[object, ...]]


def token_settings(provider: ProviderConfig) -> tuple[object, ...]:
    """What a token source is built from in a provider's config: a change to any of these (a reload) gets new
    sources; a change to the IMAP or SMTP settings alone does not cost a refresh."""
    return (
        provider.token_uri,
        provider.client_id,
        provider.client_secret,
        provider.ca_file,
        provider.timeout,
        provider.service_account_file,
        provider.app_only,
        provider.scopes,
    )


def _still_current(source: TokenSource, credential: Credential) -> bool:
    if isinstance(source, OAuthRefreshTokenSource):
        return source.holds(credential.secret)
    return True  # delegated: no secret of its own


def delegated_token_source(
    email: str, provider: ProviderConfig, *, clock: Clock, on_refresh: Callable[[bool], None] | None = None
) -> TokenSource:
    """A token for ``email`` without its consent: Workspace domain-wide delegation or Microsoft 365 app-only."""
    if provider.service_account_file is not None:
        return ServiceAccountTokenSource(
            key_file=provider.service_account_file,
            subject=email,
            scopes=[s for s in provider.scopes if s not in IDENTITY_SCOPES] or ["https://mail.google.com/"],
            clock=clock,
            ca_file=provider.ca_file,
            timeout=provider.timeout,
            on_refresh=on_refresh,
        )
    if provider.app_only:
        assert provider.token_uri is not None
        assert provider.client_id is not None
        assert provider.client_secret is not None
        return ClientCredentialsTokenSource(
            token_uri=provider.token_uri,
            client_id=provider.client_id,
            client_secret=provider.client_secret,
            clock=clock,
            ca_file=provider.ca_file,
            timeout=provider.timeout,
            on_refresh=on_refresh,
        )
    raise AccountFailed(
        f"{email} was added with --delegated but provider {provider.name!r} has neither service_account_file "
        "(Google Workspace) nor app_only = true (Microsoft 365)"
    )
