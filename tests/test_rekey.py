"""`inboxd secrets rotate` / `prune` over SQLite and PostgreSQL: every credential moves to the new key in one
transaction, old keys stay until no row needs them, a running daemon keeps reading, and a row no key opens stops
the rotation with nothing changed. No key ever shows in a message."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from inboxd.clock import FakeClock
from inboxd.config import Config, parse_config
from inboxd.crypto import SecretBox, add_key, init_key_file
from inboxd.errors import SecretsError
from inboxd.models import MailCredential
from inboxd.rekey import prune_command, reencrypt_credentials, rotate_command, verify_credentials
from inboxd.store import Credential, Store

creds_t = MailCredential.__table__  # type: ignore[attr-defined]

SECRETS = {
    "anna@corp.test": Credential("oauth2_refresh", "1//anna-refresh-token"),
    "bob@corp.test": Credential("password", "bob's imap password"),
    "carl@corp.test": Credential("oauth2_refresh", "1//carl-refresh-token"),
    "dora@corp.test": Credential("password", "dora's password ünïcode"),
    "emil@corp.test": Credential("oauth2_refresh", "1//emil-refresh-token"),
}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.key"
    init_key_file(path)
    return path


@pytest.fixture
def config(tmp_path: Path, db_url: str, key_file: Path) -> Config:
    text = f'state_dir = "{tmp_path}"\n[database]\nurl = "{db_url}"\n[secrets]\nkey_file = "{key_file}"\n'
    return parse_config(text, path=tmp_path / "inboxd.toml", env={})


@pytest.fixture
def accounts(engine: sa.Engine, key_file: Path) -> dict[int, str]:
    """Five accounts with credentials under the original key: account id -> plaintext secret."""
    store = Store(engine, clock=FakeClock(), secret_box=SecretBox.from_key_file(key_file))
    return {store.add_account(email, "local", cred).id: cred.secret for email, cred in SECRETS.items()}


def _ciphertexts(engine: sa.Engine) -> dict[int, bytes]:
    with engine.connect() as conn:
        return {r.account_id: bytes(r.secret) for r in conn.execute(sa.select(creds_t.c.account_id, creds_t.c.secret))}


def _keys_in(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line and not line.startswith(b"#")]


def _store_row_under(engine: sa.Engine, account_id: int, box: SecretBox, plaintext: str) -> None:
    with engine.begin() as conn:
        conn.execute(creds_t.update().where(creds_t.c.account_id == account_id).values(secret=box.encrypt(plaintext)))


def test_rotate_moves_every_credential_to_the_new_key_and_keeps_old_keys_until_prune(
    engine: sa.Engine, config: Config, key_file: Path, accounts: dict[int, str]
) -> None:
    old_file = key_file.read_bytes()
    (old_key,) = _keys_in(key_file)
    before = _ciphertexts(engine)

    message = rotate_command(config, engine)

    assert "re-encrypted 5 of 5 stored credentials" in message
    assert "inboxd secrets prune" in message
    assert str(key_file) in message
    assert key_file.read_bytes().endswith(old_file)  # the old key is still in the file
    new_key = _keys_in(key_file)[0]
    new_only, old_only = SecretBox([new_key]), SecretBox([old_key])
    after = _ciphertexts(engine)
    assert after.keys() == before.keys()
    for account_id, plaintext in accounts.items():
        assert after[account_id] != before[account_id]
        assert new_only.decrypt(after[account_id]) == plaintext  # the new key alone opens every row
        with pytest.raises(SecretsError):
            old_only.decrypt(after[account_id])
    assert verify_credentials(engine, new_only) == []

    pruned = prune_command(config, engine)

    assert pruned.startswith(f"removed 1 old key from {key_file}")
    assert _keys_in(key_file) == [new_key]
    store = Store(engine, clock=FakeClock(), secret_box=SecretBox.from_key_file(key_file))
    assert {i: store.credential(i).secret for i in accounts} == accounts


def test_reencrypt_works_in_chunks_and_a_second_run_rewrites_nothing(
    engine: sa.Engine, key_file: Path, accounts: dict[int, str]
) -> None:
    add_key(key_file)
    box = SecretBox.from_key_file(key_file)
    first = reencrypt_credentials(engine, box, chunk_rows=2)  # 5 rows: chunks of 2, 2 and 1
    assert (first.rotated, first.total) == (5, 5)
    rotated = _ciphertexts(engine)
    second = reencrypt_credentials(engine, box, chunk_rows=2)
    assert (second.rotated, second.total) == (0, 5)
    assert _ciphertexts(engine) == rotated
    assert verify_credentials(engine, box.primary_only()) == []


def test_prune_refuses_while_a_row_is_under_an_old_key(
    engine: sa.Engine, config: Config, key_file: Path, accounts: dict[int, str]
) -> None:
    (old_key,) = _keys_in(key_file)
    add_key(key_file)  # a rotation that crashed before re-encrypting: every row still under the old key
    before = key_file.read_bytes()
    with pytest.raises(SecretsError) as info:
        prune_command(config, engine)
    assert "nothing was pruned" in str(info.value)
    assert all(f"{i} ({email})" in str(info.value) for i, email in zip(accounts, SECRETS, strict=True))
    assert key_file.read_bytes() == before

    rotate_command(config, engine)  # finishes the job; then one node still on the old key file writes a row
    stale_id = next(iter(accounts))
    _store_row_under(engine, stale_id, SecretBox([old_key]), "1//written by a stale node")
    before = key_file.read_bytes()
    with pytest.raises(SecretsError, match=rf"account {stale_id} \(anna@corp\.test\) are still encrypted") as info:
        prune_command(config, engine)
    assert "bob@corp.test" not in str(info.value)
    assert key_file.read_bytes() == before


def test_a_daemon_loaded_before_the_rotation_reads_and_writes_under_the_new_key(
    engine: sa.Engine, config: Config, key_file: Path, accounts: dict[int, str]
) -> None:
    """A daemon running during the rotation (here, or on a node sharing the key file) holds the old key only."""
    running = Store(engine, clock=FakeClock(), secret_box=SecretBox.from_key_file(key_file))
    rotate_command(config, engine)
    assert {i: running.credential(i).secret for i in accounts} == accounts  # reloaded the rotated file
    account_id = next(iter(accounts))
    running.replace_refresh_token(account_id, "1//rotated by the provider")
    new_only = SecretBox.from_key_file(key_file).primary_only()
    assert new_only.decrypt(_ciphertexts(engine)[account_id]) == "1//rotated by the provider"
    assert prune_command(config, engine).startswith("removed 1 old key")


def test_a_row_under_an_unknown_key_fails_rotate_with_nothing_changed(
    engine: sa.Engine, config: Config, key_file: Path, accounts: dict[int, str], tmp_path: Path
) -> None:
    lost = tmp_path / "lost.key"
    init_key_file(lost)
    bad_id = max(accounts)  # the last row: earlier chunks were already rewritten when it fails
    _store_row_under(engine, bad_id, SecretBox.from_key_file(lost), "1//under a lost key")
    rows, key_bytes = _ciphertexts(engine), key_file.read_bytes()

    with pytest.raises(SecretsError) as info:
        rotate_command(config, engine)
    assert f"account {bad_id} (emil@corp.test)" in str(info.value)
    assert "nothing was changed" in str(info.value)
    assert _ciphertexts(engine) == rows
    assert key_file.read_bytes() == key_bytes  # checked before a key was added

    add_key(key_file)  # re-encryption on its own (or a row spoiled after rotate's check): the transaction rolls back
    with pytest.raises(SecretsError) as info:
        reencrypt_credentials(engine, SecretBox.from_key_file(key_file), chunk_rows=2)
    assert f"account {bad_id} (emil@corp.test)" in str(info.value)
    assert "nothing was re-encrypted" in str(info.value)
    assert _ciphertexts(engine) == rows


def test_no_message_shows_key_material_or_a_secret(
    engine: sa.Engine, config: Config, key_file: Path, accounts: dict[int, str], tmp_path: Path
) -> None:
    lost = tmp_path / "lost.key"
    init_key_file(lost)
    messages = [rotate_command(config, engine)]
    _store_row_under(engine, min(accounts), SecretBox([_keys_in(key_file)[1]]), "1//stale")  # under the old key
    with pytest.raises(SecretsError) as refused:
        prune_command(config, engine)
    messages.append(str(refused.value))
    _store_row_under(engine, max(accounts), SecretBox.from_key_file(lost), "1//lost")
    with pytest.raises(SecretsError) as failed:
        rotate_command(config, engine)
    messages.append(str(failed.value))
    add_key(key_file)
    with pytest.raises(SecretsError) as failed_inside:
        reencrypt_credentials(engine, SecretBox.from_key_file(key_file))
    messages.append(str(failed_inside.value))
    assert failed_inside.value.__cause__ is None
    keys = [k.decode() for k in _keys_in(key_file) + _keys_in(lost)]
    secrets = [*accounts.values(), "1//stale", "1//lost"]
    for message in messages:
        assert not any(key[:16] in message for key in keys), message
        assert not any(secret in message for secret in secrets), message


def test_a_token_refresh_racing_the_reencryption_is_never_undone(
    engine: sa.Engine, key_file: Path, accounts: dict[int, str]
) -> None:
    """A daemon stores a provider's rotated refresh token while the rows are re-encrypted. PostgreSQL: the row lock
    (FOR UPDATE) makes it wait for the commit. SQLite: it lands before the transaction's first write, and the
    compare-and-set re-reads the row instead of writing the older token back."""
    add_key(key_file)
    box = SecretBox.from_key_file(key_file)
    daemon = Store(engine, clock=FakeClock(), secret_box=SecretBox.from_key_file(key_file))
    target = min(accounts)  # the first row rewritten
    writers: list[threading.Thread] = []

    def refresh_before_the_first_update(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if writers or not statement.startswith("UPDATE inboxd_credentials"):
            return
        writer = threading.Thread(target=daemon.replace_refresh_token, args=(target, "1//fresh from the provider"))
        writers.append(writer)
        writer.start()
        writer.join(timeout=1)  # done at once, unless it waits for this transaction's row lock

    sa.event.listen(engine, "before_cursor_execute", refresh_before_the_first_update)
    try:
        report = reencrypt_credentials(engine, box)
    finally:
        sa.event.remove(engine, "before_cursor_execute", refresh_before_the_first_update)
    writers[0].join(timeout=30)
    assert not writers[0].is_alive()
    assert (report.rotated, report.total) == (5, 5)
    assert daemon.credential(target).secret == "1//fresh from the provider"
    assert verify_credentials(engine, box.primary_only()) == []
