"""Token life across nodes: one refresh at a time per account, and a rotated refresh token (Microsoft rotates on
every use) stored atomically, so that two nodes sharing one database never strand an account."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness.oauth import OAuthServer
from inboxd import db
from inboxd.clock import SystemClock
from inboxd.config import ProviderConfig
from inboxd.connections import Connections
from inboxd.crypto import SecretBox
from inboxd.errors import AccountFailed, ReauthRequired
from inboxd.store import Credential, Store

USER = "rita@example.test"


def provider(oauth: OAuthServer) -> ProviderConfig:
    return ProviderConfig(
        name="m365",
        kind="microsoft",
        imap_host="127.0.0.1",
        imap_port=1,
        imap_tls="plain",
        smtp_host=None,
        smtp_port=None,
        smtp_tls=None,
        auth="oauth2",
        token_uri=oauth.token_uri,
        client_id=oauth.client_id,
        client_secret=oauth.client_secret,
        ca_file=None,
        timeout=5,
    )


def node(db_url: str, box: SecretBox) -> tuple[sa.Engine, Store, Connections]:
    """What one `inboxd run` holds: its own engine (connection pool), store and connections."""
    engine = db.create_engine(db_url)
    store = Store(engine, clock=SystemClock(), secret_box=box)
    return engine, store, Connections(store, clock=SystemClock())


def test_two_nodes_refreshing_rotating_tokens_never_strand_the_account(
    db_url: str, secret_box: SecretBox, oauth_server: OAuthServer
) -> None:
    oauth_server.admin("config", rotate_refresh="1")  # every refresh returns a new token; the old one dies at once
    first = oauth_server.refresh_token(USER)
    nodes = [node(db_url, secret_box) for _ in range(2)]
    try:
        account = nodes[0][1].add_account(USER, "m365", Credential("oauth2_refresh", first))
        errors: list[BaseException] = []

        def refresh_many(connections: Connections, store: Store) -> None:
            try:
                for _ in range(8):
                    source = connections.token_source(account, provider(oauth_server), store.credential(account.id))
                    source.invalidate()  # as after a server's AUTHENTICATE failure: a refresh, not the cache
                    assert source.access_token()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=refresh_many, args=(c, s)) for _e, s, c in nodes for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors

        stored = nodes[1][1].credential(account.id).secret
        assert stored != first
        # a refresh with a dead token would have raised (invalid_grant) above. The two threads of a node share its
        # token source, so one's invalidate may be met by the other's refresh: at most one refresh per call
        assert 16 <= oauth_server.stats()["grant:refresh_token"] <= 32
        # the stored token is the live one: a fresh node (a restart) can refresh with it
        _e, store, connections = node(db_url, secret_box)
        assert connections.token_source(account, provider(oauth_server), store.credential(account.id)).access_token()
        store.engine.dispose()
    finally:
        for engine, _s, _c in nodes:
            engine.dispose()


def test_a_disconnected_account_cannot_refresh(db_url: str, secret_box: SecretBox, oauth_server: OAuthServer) -> None:
    engine, store, connections = node(db_url, secret_box)
    try:
        account = store.add_account(USER, "m365", Credential("oauth2_refresh", oauth_server.refresh_token(USER)))
        source = connections.token_source(account, provider(oauth_server), store.credential(account.id))
        store.disconnect_account(account.id, "disconnected")
        with pytest.raises(ReauthRequired, match="disconnected"):
            source.access_token()
    finally:
        engine.dispose()


def test_rotated_token_survives_a_restart(
    db_url: str, secret_box: SecretBox, oauth_server: OAuthServer, tmp_path: Path
) -> None:
    oauth_server.admin("config", rotate_refresh="1")
    engine, store, connections = node(db_url, secret_box)
    try:
        account = store.add_account(USER, "m365", Credential("oauth2_refresh", oauth_server.refresh_token(USER)))
        connections.token_source(account, provider(oauth_server), store.credential(account.id)).access_token()
    finally:
        engine.dispose()
    engine, store, connections = node(db_url, secret_box)  # a new process reads only what was stored
    try:
        assert connections.token_source(account, provider(oauth_server), store.credential(account.id)).access_token()
    finally:
        engine.dispose()


def test_rotating_refresh_tokens_refresh_once_per_expiry_not_per_connection(
    db_url: str, secret_box: SecretBox, oauth_server: OAuthServer
) -> None:
    """Microsoft rotates the refresh token on every refresh; each IMAP or SMTP connection asks Connections for the
    account's source with the credential stored now. The token the source rotated to itself is no reason for a new
    source (which would refresh again): five connections within the access token's life cost one refresh."""
    oauth_server.admin("config", rotate_refresh="1")
    first = oauth_server.refresh_token(USER)
    engine, store, connections = node(db_url, secret_box)
    try:
        account = store.add_account(USER, "m365", Credential("oauth2_refresh", first))
        tokens = {
            connections.token_source(account, provider(oauth_server), store.credential(account.id)).access_token()
            for _ in range(5)
        }
        assert len(tokens) == 1
        assert store.credential(account.id).secret != first  # it did rotate, and the rotated token was stored
        assert oauth_server.stats()["grant:refresh_token"] == 1
    finally:
        engine.dispose()


def test_a_provider_change_reaches_accounts_whose_refresh_token_did_not_change(
    db_url: str, secret_box: SecretBox, oauth_server: OAuthServer
) -> None:
    """A reload that fixes the provider's client secret gets the account a new source at its next connection:
    the old source, built with the wrong secret, is not kept because the refresh token stayed the same."""
    engine, store, connections = node(db_url, secret_box)
    try:
        account = store.add_account(USER, "m365", Credential("oauth2_refresh", oauth_server.refresh_token(USER)))
        wrong = dataclasses.replace(provider(oauth_server), client_secret="not-the-client-secret")
        with pytest.raises(AccountFailed, match="invalid_client"):
            connections.token_source(account, wrong, store.credential(account.id)).access_token()
        fixed = connections.token_source(account, provider(oauth_server), store.credential(account.id))
        assert fixed.access_token()
        # an unchanged provider (or one whose IMAP settings alone changed) keeps the source and its token
        moved = dataclasses.replace(provider(oauth_server), imap_host="imap.example.test")
        assert connections.token_source(account, moved, store.credential(account.id)) is fixed
    finally:
        engine.dispose()


def test_a_reconnect_gets_a_new_source_without_the_old_grants_token(
    db_url: str, secret_box: SecretBox, oauth_server: OAuthServer
) -> None:
    """Connecting the mailbox again stores a refresh token the source never held: the next connection gets a new
    source, which refreshes with the new grant instead of serving the access token of the old one."""
    oauth_server.admin("config", rotate_refresh="1")
    engine, store, connections = node(db_url, secret_box)
    try:
        account = store.add_account(USER, "m365", Credential("oauth2_refresh", oauth_server.refresh_token(USER)))
        old = connections.token_source(account, provider(oauth_server), store.credential(account.id)).access_token()
        store.add_account(USER, "m365", Credential("oauth2_refresh", oauth_server.refresh_token(USER)))
        new = connections.token_source(account, provider(oauth_server), store.credential(account.id)).access_token()
        assert new != old
        assert oauth_server.stats()["grant:refresh_token"] == 2
    finally:
        engine.dispose()
