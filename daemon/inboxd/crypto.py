"""Credentials at rest: Fernet (AES-CBC + HMAC) with a key kept in a 0600 file, never in the database.

The key file holds one Fernet key per line; the first encrypts, all decrypt (MultiFernet), so keys can rotate.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from inboxd.errors import SecretsError


def init_key_file(path: Path, *, overwrite: bool = False) -> None:
    """Write a fresh random key to ``path`` (mode 0600, parent 0700 if created); refuse to clobber a key."""
    if path.exists() and not overwrite:
        raise SecretsError(
            f"{path} already exists; refusing to replace it: credentials encrypted with it would be lost"
        )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Written under a temporary name first, so a crash never leaves a half-written key behind.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(Fernet.generate_key() + b"\n")
                out.flush()
                os.fsync(out.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if someone created the key meanwhile; never clobbers
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    except FileExistsError:
        raise SecretsError(f"{path} already exists; refusing to replace it") from None
    except OSError as exc:
        raise SecretsError(f"cannot write key file {path}: {exc.strerror}") from None


class SecretBox:
    """Encrypts and decrypts stored credentials; knows the key file's path, never shows the key."""

    def __init__(self, keys: Sequence[bytes], *, source: str = "<in-memory key>") -> None:
        if not keys:
            raise SecretsError(f"{source} holds no key")
        try:
            self._fernet = MultiFernet([Fernet(key) for key in keys])
        except ValueError:
            # `from None`: the chained exception's frame would carry the key bytes.
            raise SecretsError(f"{source} does not hold a valid Fernet key") from None
        self._source = source
        self._key_count = len(keys)

    @classmethod
    def from_key_file(cls, path: Path) -> SecretBox:
        try:
            info = path.stat()
        except FileNotFoundError:
            raise SecretsError(
                f"key file {path} not found; restore it from backup (a new key cannot decrypt stored "
                "credentials) or, on a fresh install, create one"
            ) from None
        except OSError as exc:
            raise SecretsError(f"cannot read key file {path}: {exc.strerror}") from None
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise SecretsError(f"key file {path} is accessible to other users (mode {mode:04o}); run: chmod 600 {path}")
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise SecretsError(f"cannot read key file {path}: {exc.strerror}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith(b"#")]
        if not keys:
            raise SecretsError(f"key file {path} is empty")
        return cls(keys, source=str(path))

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode("utf-8")
        except InvalidToken:
            raise SecretsError(f"stored credentials cannot be decrypted with {self._source}; wrong key file?") from None

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt ``token`` with the first (newest) key of the file."""
        try:
            return self._fernet.rotate(token)
        except InvalidToken:
            raise SecretsError(f"stored credentials cannot be decrypted with {self._source}; wrong key file?") from None

    def __repr__(self) -> str:
        return f"SecretBox({self._source}, keys={self._key_count})"

    __str__ = __repr__
