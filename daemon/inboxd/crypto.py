"""Credentials at rest: Fernet (AES-CBC + HMAC) with a key kept in a 0600 file, never in the database.

The key file holds one Fernet key per line; the first encrypts, all decrypt (MultiFernet), so keys can rotate:
`add_key` puts a new key on top, `prune_keys` drops the old ones once no stored credential needs them.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from inboxd.errors import SecretsError

# (device, inode, size, mtime): a key file rewritten by add_key/prune_keys, or copied over, differs in one of them.
FileId = tuple[int, int, int, int]
_FernetOperation = Callable[[MultiFernet], bytes]


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
        if path.parent.exists() and not path.parent.is_dir():
            raise SecretsError(f"cannot write key file {path}: {path.parent} is not a directory") from None
        raise SecretsError(f"{path} already exists; refusing to replace it") from None
    except OSError as exc:
        raise SecretsError(f"cannot write key file {path}: {exc.strerror}") from None


def add_key(path: Path, *, now: datetime | None = None) -> None:
    """Put a fresh key on top of the key file (it encrypts from now on), keeping the old keys below it (they still
    decrypt). Atomic: readers see the old file or the new one, never a mix."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with _locked_key_file(path) as (real, content, info):
        _parse_keys(content, str(path))  # never stack a new key on a file that does not load
        header = f"# added {stamp}\n".encode()
        _replace_key_file(real, header + Fernet.generate_key() + b"\n" + content.rstrip(b"\n") + b"\n", info, path)


def prune_keys(path: Path, *, unchanged_since: FileId | None = None) -> int:
    """Keep only the first key of the key file (and the comments above it); return how many keys were removed.

    ``unchanged_since``: refuse if the file is no longer the one with that identity (a rotation ran since the
    caller checked the stored credentials against its first key)."""
    with _locked_key_file(path) as (real, content, info):
        if unchanged_since is not None and _file_id(info) != unchanged_since:
            raise SecretsError(f"key file {path} changed while the stored credentials were checked; run prune again")
        keys = _parse_keys(content, str(path))
        if len(keys) == 1:
            return 0
        kept: list[bytes] = []
        for line in content.splitlines():
            kept.append(line)
            if line.strip() == keys[0]:
                break
        _replace_key_file(real, b"\n".join(kept) + b"\n", info, path)
        return len(keys) - 1


@dataclass(frozen=True, slots=True)
class _Keys:
    fernet: MultiFernet
    primary: bytes
    all: tuple[bytes, ...]
    count: int
    file_id: FileId | None


class SecretBox:
    """Encrypts and decrypts stored credentials; knows the key file's path, never shows the key.

    A box loaded from a file notices when the file is replaced (a rotation on this or another node sharing it):
    a token it cannot decrypt makes it reload the file once and retry, and encrypting uses the file's newest key.
    """

    def __init__(self, keys: Sequence[bytes], *, source: str = "<in-memory key>") -> None:
        self._source = source
        self._path: Path | None = None
        self._reload_lock = threading.Lock()
        self._keys = _make_keys(keys, source, None)

    @classmethod
    def from_key_file(cls, path: Path) -> SecretBox:
        keys, file_id = _load_key_file(path)
        box = cls(keys, source=str(path))
        box._path = path
        box._keys = replace(box._keys, file_id=file_id)
        return box

    @property
    def source(self) -> str:
        """The key file's path (or a placeholder for in-memory keys), for messages."""
        return self._source

    @property
    def file_id(self) -> FileId | None:
        """The identity of the key file this box's keys were read from (None for in-memory keys)."""
        return self._keys.file_id

    def primary_only(self) -> SecretBox:
        """A box holding only the first (encrypting) key: what is left after `prune_keys`."""
        return SecretBox([self._keys.primary], source=f"the first key of {self._source}")

    def derived(self, purpose: str) -> MultiFernet:
        """A key for something other than credentials (the connect flow's state), derived from each key of the file
        (HKDF-SHA256, ``purpose`` as info): never the credentials' own key, and it rotates with the file."""
        with contextlib.suppress(SecretsError):
            self._reload_if_changed()
        return MultiFernet([Fernet(_derive(key, purpose)) for key in self._keys.all])

    def encrypt(self, plaintext: str) -> bytes:
        # Encrypt with the newest key once the file has rotated, so the rows this process writes do not hold up
        # `secrets prune`. A file that cannot be read now keeps the keys already loaded: failing here would lose
        # the refresh token a provider has just rotated.
        with contextlib.suppress(SecretsError):
            self._reload_if_changed()
        return self._keys.fernet.encrypt(plaintext.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        return self._with_reload(lambda fernet: fernet.decrypt(token)).decode("utf-8")

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt ``token`` with the first (newest) key of the file."""
        return self._with_reload(lambda fernet: fernet.rotate(token))

    def _with_reload(self, operation: _FernetOperation) -> bytes:
        try:
            return operation(self._keys.fernet)
        except InvalidToken:
            pass
        # Another process may have rotated the key file since this box loaded it: pick the new keys up once.
        if self._reload_if_changed():
            try:
                return operation(self._keys.fernet)
            except InvalidToken:
                pass
        raise SecretsError(f"stored credentials cannot be decrypted with {self._source}; wrong key file?")

    def _reload_if_changed(self) -> bool:
        if self._path is None:
            return False
        with self._reload_lock:
            try:
                current = _file_id(self._path.stat())
            except OSError:
                return False  # gone or unreadable: the keys in memory are all there is
            if current == self._keys.file_id:
                return False
            keys, file_id = _load_key_file(self._path)
            self._keys = _make_keys(keys, self._source, file_id)
            return True

    def __repr__(self) -> str:
        return f"SecretBox({self._source}, keys={self._keys.count})"

    __str__ = __repr__


def _derive(key: bytes, purpose: str) -> bytes:
    raw = base64.urlsafe_b64decode(key)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(raw)
    return base64.urlsafe_b64encode(derived)


def _make_keys(keys: Sequence[bytes], source: str, file_id: FileId | None) -> _Keys:
    if not keys:
        raise SecretsError(f"{source} holds no key")
    try:
        fernet = MultiFernet([Fernet(key) for key in keys])
    except ValueError:
        # `from None`: the chained exception's frame would carry the key bytes.
        raise SecretsError(f"{source} does not hold a valid Fernet key") from None
    return _Keys(
        fernet=fernet, primary=bytes(keys[0]), all=tuple(bytes(k) for k in keys), count=len(keys), file_id=file_id
    )


def _file_id(info: os.stat_result) -> FileId:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _parse_keys(content: bytes, source: str) -> list[bytes]:
    keys = [line.strip() for line in content.splitlines() if line.strip() and not line.strip().startswith(b"#")]
    if not keys:
        raise SecretsError(f"key file {source} is empty")
    _make_keys(keys, source, None)  # refuse a file holding something that is not a key
    return keys


def _load_key_file(path: Path) -> tuple[list[bytes], FileId]:
    try:
        # One descriptor for the mode check, the identity and the bytes: all three describe the same file even if
        # the path is replaced meanwhile.
        with path.open("rb") as key_file:
            info = os.fstat(key_file.fileno())
            if info.st_mode & 0o077:
                mode = stat.S_IMODE(info.st_mode)
                raise SecretsError(
                    f"key file {path} is accessible to other users (mode {mode:04o}); run: chmod 600 {path}"
                )
            content = key_file.read()
    except FileNotFoundError:
        raise SecretsError(
            f"key file {path} not found; restore it from backup (a new key cannot decrypt stored "
            "credentials) or, on a fresh install, create one"
        ) from None
    except OSError as exc:
        raise SecretsError(f"cannot read key file {path}: {exc.strerror}") from None
    return _parse_keys(content, str(path)), _file_id(info)


@contextlib.contextmanager
def _locked_key_file(path: Path) -> Iterator[tuple[Path, bytes, os.stat_result]]:
    """The key file's real path (symlinks followed: a shared key file stays shared), content and stat, under an
    exclusive flock, so two rotations on one host never both rewrite it and lose a key."""
    real = Path(os.path.realpath(path))
    while True:
        try:
            fd = os.open(real, os.O_RDONLY)
        except FileNotFoundError:
            raise SecretsError(f"key file {path} not found; create it with `inboxd secrets init`") from None
        except OSError as exc:
            raise SecretsError(f"cannot read key file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            info = os.fstat(fd)
            try:
                now_there = os.stat(real)
            except FileNotFoundError:
                now_there = None
            if now_there is None or (now_there.st_dev, now_there.st_ino) != (info.st_dev, info.st_ino):
                continue  # replaced while this process waited for the lock: lock the new file instead
            with os.fdopen(os.dup(fd), "rb") as key_file:
                content = key_file.read()
            yield real, content, info
            return
        except OSError as exc:
            raise SecretsError(f"cannot read key file {path}: {exc.strerror}") from None
        finally:
            os.close(fd)


def _replace_key_file(real: Path, content: bytes, old: os.stat_result, shown: Path) -> None:
    """Write ``content`` next to ``real`` and rename it over; the new file keeps the old one's owner and mode."""
    mode = stat.S_IMODE(old.st_mode) & 0o700 or 0o600
    try:
        fd, tmp_name = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")  # mode 0600
    except OSError as exc:
        raise SecretsError(f"cannot write key file {shown}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            mine = os.fstat(out.fileno())
            if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid):
                os.fchown(out.fileno(), old.st_uid, old.st_gid)  # root rotating the service user's key file
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, real)
        _fsync_directory(real.parent)
    except OSError as exc:
        raise SecretsError(f"cannot write key file {shown}: {exc.strerror}; it is unchanged") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory is; some filesystems cannot fsync a directory, which is fine.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
