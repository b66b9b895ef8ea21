"""SecretBox and the key file: round trips, file modes, refusals, and the key never shown."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from inboxd.crypto import SecretBox, init_key_file
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
