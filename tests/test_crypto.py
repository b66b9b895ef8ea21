"""SecretBox and the key file: round trips, file modes, refusals, and the key never shown."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from inboxd.crypto import SecretBox, add_key, init_key_file, prune_keys
from inboxd.errors import SecretsError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_key_file_creates_a_0600_key_in_a_0700_directory(tmp_path: Path) -> None:
    key_file = tmp_path / "state" / "secret.key"
    init_key_file(key_file)
    assert _mode(key_file) == 0o600
    assert _mode(key_file.parent) == 0o700
    Fernet(key_file.read_bytes().strip())  # a valid Fernet key
    assert [p.name for p in key_file.parent.iterdir()] == ["secret.key"]  # no temp file left behind


def test_init_key_file_refuses_to_replace_a_key(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    before = key_file.read_bytes()
    with pytest.raises(SecretsError, match="already exists"):
        init_key_file(key_file)
    assert key_file.read_bytes() == before


def test_init_key_file_overwrite_writes_a_new_key(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    before = key_file.read_bytes()
    init_key_file(key_file, overwrite=True)
    assert key_file.read_bytes() != before
    assert _mode(key_file) == 0o600


def test_round_trip(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    box = SecretBox.from_key_file(key_file)
    token = box.encrypt("1//refresh-token-ünïcode")
    assert b"refresh" not in token
    assert box.decrypt(token) == "1//refresh-token-ünïcode"
    assert SecretBox.from_key_file(key_file).decrypt(token) == "1//refresh-token-ünïcode"


def test_wrong_key_names_the_key_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    init_key_file(first)
    init_key_file(second)
    token = SecretBox.from_key_file(first).encrypt("secret")
    with pytest.raises(SecretsError) as info:
        SecretBox.from_key_file(second).decrypt(token)
    assert str(info.value) == f"stored credentials cannot be decrypted with {second}; wrong key file?"


def test_missing_key_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match=r"key file .*nope\.key not found"):
        SecretBox.from_key_file(tmp_path / "nope.key")


def test_group_readable_key_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    os.chmod(key_file, 0o640)
    with pytest.raises(SecretsError, match=r"mode 0640.*chmod 600"):
        SecretBox.from_key_file(key_file)


def test_read_only_0400_key_file_is_accepted(tmp_path: Path) -> None:
    """systemd hands credentials over as 0400 files."""
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    os.chmod(key_file, 0o400)
    assert SecretBox.from_key_file(key_file).decrypt(SecretBox.from_key_file(key_file).encrypt("x")) == "x"


def test_garbage_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    key_file.write_text("not-a-fernet-key-but-secret-looking\n")
    os.chmod(key_file, 0o600)
    with pytest.raises(SecretsError) as info:
        SecretBox.from_key_file(key_file)
    assert "does not hold a valid Fernet key" in str(info.value)
    assert "secret-looking" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_empty_key_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    key_file.write_text("\n# only a comment\n")
    os.chmod(key_file, 0o600)
    with pytest.raises(SecretsError, match="is empty"):
        SecretBox.from_key_file(key_file)


def test_key_never_appears_in_repr_or_str(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    key = key_file.read_bytes().strip().decode()
    box = SecretBox.from_key_file(key_file)
    assert key not in repr(box)
    assert key not in str(box)
    assert str(key_file) in repr(box)


def test_second_key_line_still_decrypts_after_rotation(tmp_path: Path) -> None:
    """Key rotation: new key on the first line encrypts, the old one below keeps old rows readable."""
    old_key, new_key = Fernet.generate_key(), Fernet.generate_key()
    old_token = SecretBox([old_key]).encrypt("old secret")
    key_file = tmp_path / "secret.key"
    key_file.write_bytes(new_key + b"\n" + old_key + b"\n")
    os.chmod(key_file, 0o600)
    box = SecretBox.from_key_file(key_file)
    assert box.decrypt(old_token) == "old secret"
    rotated = box.rotate(old_token)
    assert SecretBox([new_key]).decrypt(rotated) == "old secret"


# --- rotation: add_key, prune_keys, and a running process picking up a rotated file -------------------------------


def _keys_in(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line and not line.startswith(b"#")]


def test_add_key_prepends_a_new_key_and_keeps_the_old_ones_in_a_0600_file(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    old = key_file.read_bytes()
    old_token = SecretBox.from_key_file(key_file).encrypt("old secret")
    add_key(key_file)
    assert _mode(key_file) == 0o600
    assert key_file.read_bytes().endswith(old)  # the old key, untouched, below the new one
    assert key_file.read_bytes().startswith(b"# added ")
    new_key, old_key = _keys_in(key_file)
    assert old_key == old.strip()
    box = SecretBox.from_key_file(key_file)
    assert box.decrypt(old_token) == "old secret"
    assert SecretBox([new_key]).decrypt(box.encrypt("new secret")) == "new secret"  # the new key encrypts
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no temp file left behind


def test_add_key_keeps_a_read_only_0400_mode(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    os.chmod(key_file, 0o400)
    add_key(key_file)
    assert _mode(key_file) == 0o400
    assert len(_keys_in(key_file)) == 2


def test_add_key_rewrites_the_target_of_a_symlinked_key_file(tmp_path: Path) -> None:
    """A key file shared through a symlink stays shared: the link is kept, the file it points to gets the key."""
    shared = tmp_path / "shared" / "secret.key"
    init_key_file(shared)
    link = tmp_path / "secret.key"
    link.symlink_to(shared)
    add_key(link)
    assert link.is_symlink()
    assert len(_keys_in(shared)) == 2
    assert _mode(shared) == 0o600


def test_concurrent_add_key_calls_lose_no_key(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: add_key(key_file), range(8)))
    assert len(set(_keys_in(key_file))) == 9


def test_add_key_refuses_a_file_that_holds_no_valid_key(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    key_file.write_text("not-a-fernet-key-but-secret-looking\n")
    os.chmod(key_file, 0o600)
    with pytest.raises(SecretsError, match="does not hold a valid Fernet key") as info:
        add_key(key_file)
    assert "secret-looking" not in str(info.value)
    assert key_file.read_text() == "not-a-fernet-key-but-secret-looking\n"


def test_add_key_on_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match=r"key file .*nope\.key not found"):
        add_key(tmp_path / "nope.key")


def test_prune_keys_keeps_only_the_first_key(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    add_key(key_file)
    add_key(key_file)
    first = _keys_in(key_file)[0]
    assert prune_keys(key_file) == 2
    assert _keys_in(key_file) == [first]
    assert _mode(key_file) == 0o600
    assert prune_keys(key_file) == 0  # nothing left to prune
    assert _keys_in(key_file) == [first]


def test_prune_keys_refuses_a_file_changed_since_it_was_checked(tmp_path: Path) -> None:
    """prune after a check against the first key: a rotation in between would make it drop the key rows need."""
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    add_key(key_file)
    checked = SecretBox.from_key_file(key_file).file_id
    add_key(key_file)  # another admin rotates meanwhile
    before = key_file.read_bytes()
    with pytest.raises(SecretsError, match="changed while the stored credentials were checked"):
        prune_keys(key_file, unchanged_since=checked)
    assert key_file.read_bytes() == before


def test_a_box_loaded_before_a_rotation_reloads_the_file_once_to_decrypt(tmp_path: Path) -> None:
    """A running daemon (or another node sharing the key file) reads rows re-encrypted under the new key."""
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    running = SecretBox.from_key_file(key_file)
    add_key(key_file)
    rotated = SecretBox.from_key_file(key_file).encrypt("refresh token")
    assert running.decrypt(rotated) == "refresh token"
    assert "keys=2" in repr(running)


def test_a_box_loaded_before_a_rotation_encrypts_with_the_new_key(tmp_path: Path) -> None:
    """Rows a running daemon writes after the rotation (a provider's rotated refresh token) need no old key."""
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    running = SecretBox.from_key_file(key_file)
    add_key(key_file)
    new_only = SecretBox.from_key_file(key_file).primary_only()
    assert new_only.decrypt(running.encrypt("rotated by the provider")) == "rotated by the provider"


def test_an_unchanged_key_file_is_not_reloaded_and_the_error_stays_the_same(tmp_path: Path) -> None:
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    init_key_file(first)
    init_key_file(second)
    token = SecretBox.from_key_file(first).encrypt("secret")
    box = SecretBox.from_key_file(second)
    with pytest.raises(SecretsError) as info:
        box.decrypt(token)
    assert str(info.value) == f"stored credentials cannot be decrypted with {second}; wrong key file?"
    with pytest.raises(SecretsError, match="cannot be decrypted"):
        box.rotate(token)


def test_a_reloaded_file_that_still_lacks_the_key_raises_secrets_error(tmp_path: Path) -> None:
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    init_key_file(first)
    init_key_file(second)
    token = SecretBox.from_key_file(first).encrypt("secret")
    box = SecretBox.from_key_file(second)
    add_key(second)  # changed on disk, but holds no key for the token
    with pytest.raises(SecretsError, match=r"cannot be decrypted with .*b\.key; wrong key file\?"):
        box.decrypt(token)
    assert "keys=2" in repr(box)  # it did reload


def test_a_key_file_made_unreadable_keeps_encrypting_with_the_loaded_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    box = SecretBox.from_key_file(key_file)
    add_key(key_file)
    os.chmod(key_file, 0o644)  # a botched edit: from_key_file would refuse this file
    assert SecretBox([_keys_in(key_file)[1]]).decrypt(box.encrypt("x")) == "x"


def test_no_rotation_error_shows_key_material(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    init_key_file(key_file)
    add_key(key_file)
    keys = [k.decode() for k in _keys_in(key_file)]
    messages: list[str] = []
    other = tmp_path / "other.key"
    init_key_file(other)
    foreign_token = SecretBox.from_key_file(other).encrypt("x")
    for attempt in (
        lambda: SecretBox.from_key_file(key_file).decrypt(foreign_token),
        lambda: SecretBox.from_key_file(key_file).primary_only().rotate(foreign_token),
        lambda: prune_keys(key_file, unchanged_since=(0, 0, 0, 0)),
        lambda: SecretBox([keys[0].encode()[:40]]),  # a truncated key line
    ):
        with pytest.raises(SecretsError) as info:
            attempt()
        messages.append(str(info.value))
        assert info.value.__cause__ is None
    for message in messages:
        assert not any(key in message or key[:20] in message for key in keys), message
    assert repr(SecretBox.from_key_file(key_file).primary_only()).count("keys=1") == 1
