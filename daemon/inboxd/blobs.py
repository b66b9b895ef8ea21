"""Attachment bytes, content-addressed by sha256 under one directory the HR app can read.

Layout: <attachments_dir>/<sha256[0:2]>/<sha256>; files are written once, atomically, and never modified. A file is
durable before a row names it: its bytes are fsynced before it is renamed into place, and its directory and the
store's root (which holds the <sha256[0:2]> directories) after, so that a power loss cannot undo the rename of a file
whose row was committed.
Parser processes stage the files they decode under <attachments_dir>/.staging/ (written and fsynced), and the sync
thread moves each into place (adopt) just before it commits the rows that name it: a run that is never stored (a
stop, a lost lease, a failed batch) leaves its files there, out of the store, and sweep_staging removes them.
Files that no row names any more are removed by inboxd.blob_gc; a put or adopt of bytes the store already has
refreshes the file's modification time, which tells the collection that a row is about to name it again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# put_all's writers: file writes and fsyncs release the GIL, and the filesystem commits concurrent fsyncs together
_WRITERS = 8
STAGING = ".staging"
_PUT_TEMPORARY = ".tmp-"  # put's file in the making, beside its target
# A file a collection moved out of the store for a moment (BlobStore.remove_unused), named
# gc-<sha256>.<pid>.<random>.<host>: unique across threads, processes and nodes sharing the store.
GC_ASIDE = "gc-"
# A file set aside that long ago (by its change time, which the move set) was left by a collection that died between
# its move and its decision (restore_abandoned); so is one whose process, on this host, is gone. A live collection
# keeps one aside for microseconds.
ASIDE_ABANDONED = 60.0
_HOST = socket.gethostname().replace("/", "_") or "localhost"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class StoredFile:
    sha256: str
    mtime: float  # seconds since the epoch: when it was written, or last claimed by a put or adopt
    size: int


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, sha256: str, data: bytes) -> Path:
        """Store bytes under their digest (verified), durably; a second put of the same bytes writes nothing."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("attachment bytes do not match their sha256")
        target = self.path(sha256)
        if not _claim(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _durable_file(target.parent, _PUT_TEMPORARY, data)
            try:
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        # also when the file was there: an earlier put may have died before these fsyncs (cheap when clean)
        self._sync_directories({target.parent})
        return target

    def put_all(self, blobs: Iterable[tuple[str, bytes]]) -> Callable[[], None]:
        """Start storing many (sha256, bytes) at once, in writer threads; returns the wait: it returns once every
        file is durable and raises the first failure. A sync stores a batch's attachments this way while it writes
        the batch's rows, and waits before the rows (which say the files exist) are committed."""
        unique = dict(blobs)
        if not unique:
            return lambda: None
        writers = self._writers()
        futures = [writers.submit(self.put, sha256, data) for sha256, data in unique.items()]

        def wait() -> None:
            for future in futures:
                future.result()

        return wait

    def stage_all(self, blobs: Iterable[tuple[str, bytes]]) -> Callable[[], dict[str, str]]:
        """Write many (sha256, bytes) under the staging directory, durably, in writer threads (the caller computed
        the digests from these bytes); returns the wait, which gives sha256 -> the staged file's name (for adopt)
        once every file is fsynced, and raises the first failure."""
        unique = dict(blobs)
        if not unique:
            return dict
        staging = self.root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        writers = self._writers()
        futures = {sha256: writers.submit(self._stage, staging, sha256, data) for sha256, data in unique.items()}

        def wait() -> dict[str, str]:
            return {sha256: future.result() for sha256, future in futures.items()}

        return wait

    def _stage(self, staging: Path, sha256: str, data: bytes) -> str:
        self.path(sha256)  # a digest, not a path
        return _durable_file(staging, f"{sha256}.", data).name

    def adopt(self, sha256: str, staged: str) -> bool:
        """adopt_all for one file, waited for: True when it is in the store, durably."""
        stored, durable = self.adopt_all([(sha256, staged)])
        durable()
        return sha256 in stored

    def adopt_all(self, staged: Iterable[tuple[str, str]]) -> tuple[set[str], Callable[[], None]]:
        """Move staged files (sha256, staged file name) into place, or drop a staged copy when the store has the
        file already. Returns the digests now in the store, and the wait: the directories the files went into
        and the root are fsynced in writer threads (the filesystem commits them together), and the wait returns
        once they are, raising the first failure; call it before committing rows that name the files. A digest
        missing from the result had its staged file swept (sweep_staging): its row must not say the file is
        stored."""
        stored: set[str] = set()
        directories = {self.root}
        for sha256, name in staged:
            target = self.path(sha256)
            source = self.root / STAGING / name
            if not name.startswith(f"{sha256}.") or "/" in name:
                raise ValueError("not a staged file of this digest")
            if _claim(target):
                source.unlink(missing_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(source, target)
                except FileNotFoundError:
                    if not _claim(target):  # swept; a copy written meanwhile counts only once claimed
                        continue
            # a file already in place may be an earlier call's whose directory fsync never came (it raised, or
            # the process died): its directories are synced again, which costs next to nothing when clean
            stored.add(sha256)
            directories.add(target.parent)
        if not stored:
            return stored, lambda: None
        writers = self._writers()
        futures = [writers.submit(_fsync_directory, directory) for directory in sorted(directories)]

        def durable() -> None:
            for future in futures:
                future.result()

        return stored, durable

    def _sync_directories(self, directories: set[Path]) -> None:
        """fsync each directory, then the root (whose entries, the <sha256[0:2]> directories, may be new)."""
        for directory in sorted(directories):
            _fsync_directory(directory)
        _fsync_directory(self.root)

    def sweep_staging(self, older_than: float) -> int:
        """Delete staged files older than ``older_than`` seconds (by modification time): what parser processes
        wrote for runs that were never stored. Returns how many went."""
        staging = self.root / STAGING
        cutoff = time.time() - older_than
        removed = 0
        try:
            entries = list(os.scandir(staging))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name.startswith(GC_ASIDE):  # keeps its old time, and may be about to go back into the store
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def restore_abandoned(self) -> tuple[int, int]:
        """Put back the files a collection moved aside (``gc-*`` in the staging directory) and did not live to decide
        on: it died between the move and the check, and a row may have claimed the file just before the move. One is
        abandoned when its process, on this host, is gone (a restart finds its own at once), or when it was set
        aside ASIDE_ABANDONED ago. It goes back with a fresh time, as a claim leaves it (a row about to name it is
        not committed yet), and never over a file written meanwhile: then the copy aside goes. Back in the store a
        file is at worst unused until a later collection. Returns (restored, failed): an entry that cannot be
        handled (permissions) is counted and the rest go on."""
        staging = self.root / STAGING
        cutoff = time.time() - ASIDE_ABANDONED
        restored = failed = 0
        try:
            entries = [e for e in os.scandir(staging) if e.name.startswith(GC_ASIDE)]
        except FileNotFoundError:
            return 0, 0
        for entry in entries:
            sha256, owner = _aside_owner(entry.name)
            if not _SHA256_HEX.fullmatch(sha256):
                continue  # not a name remove_unused makes: left alone
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or (info.st_ctime >= cutoff and not _gone(owner)):
                    continue  # a live collection may be deciding on it
                if self._put_back(Path(entry.path), self.path(sha256)):
                    restored += 1
            except FileNotFoundError:  # decided on meanwhile by its collection, which lives
                continue
            except OSError:
                failed += 1
        return restored, failed

    def _put_back(self, aside: Path, target: Path) -> bool:
        """Move ``aside`` back to ``target`` with a fresh time, unless ``target`` exists (written anew meanwhile):
        True when it went back. A hard link does it without a window in which a new file could be overwritten;
        where the filesystem has none, a rename after a check."""
        os.utime(aside)
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            _fsync_directory(self.root)
        try:
            os.link(aside, target)
        except FileExistsError:
            aside.unlink()
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                raise
            if target.exists():
                aside.unlink()
                return False
            os.replace(aside, target)
        else:
            aside.unlink()
        _fsync_directory(target.parent)
        return True

    def stored_files(self) -> Iterator[StoredFile]:
        """Every file in the store's layout (<sha256[0:2]>/<sha256>) with its modification time and size; not the
        staging directory, not a put's temporary files."""
        for shard in self._shards():
            try:
                entries = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not (entry.name.startswith(shard.name) and _SHA256_HEX.fullmatch(entry.name)):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield StoredFile(entry.name, info.st_mtime, info.st_size)

    def _shards(self) -> list[os.DirEntry[str]]:
        """The <sha256[0:2]> directories, in name order; none while the store does not exist yet."""
        try:
            shards = [e for e in os.scandir(self.root) if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return sorted(shards, key=lambda e: e.name)

    def sweep_temporary(self, *, unchanged_since: float, dry_run: bool = False) -> int:
        """Delete the temporary files of puts that died before their rename (``.tmp-*`` in the <sha256[0:2]>
        directories) last modified before ``unchanged_since``; returns how many (would) go."""
        removed = 0
        for shard in self._shards():
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(shard.path):
                    if not entry.name.startswith(_PUT_TEMPORARY):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat(follow_symlinks=False).st_mtime <= unchanged_since:
                            if not dry_run:
                                os.unlink(entry.path)
                            removed += 1
        return removed

    def remove_unused(self, sha256: str, *, unchanged_since: float) -> bool:
        """Delete the file of ``sha256`` unless it was modified after ``unchanged_since`` (a put or adopt of the
        same bytes refreshes it: a row is about to name it again); True when it went. Race-free against such a put
        or adopt: the file is first moved out of the store, then its time read again, and it is moved back (and its
        directory fsynced) when it changed meanwhile; a put or adopt that comes after the move finds no file and
        writes its own."""
        target = self.path(sha256)
        aside_dir = self.root / STAGING
        aside_dir.mkdir(parents=True, exist_ok=True)
        aside = aside_dir / f"{GC_ASIDE}{sha256}.{os.getpid()}.{secrets.token_hex(4)}.{_HOST}"
        try:
            if target.stat().st_mtime > unchanged_since:
                return False  # the common case of a file in use, without a rename
            os.rename(target, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.stat().st_mtime > unchanged_since:
                os.replace(aside, target)
                _fsync_directory(target.parent)
                return False
            aside.unlink()
        except FileNotFoundError:  # put back by a sweep that took it for abandoned (held here for a minute): kept
            return False
        return True

    def _writers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_WRITERS, thread_name_prefix="inboxd-blobs")
            return self._pool

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


def _aside_owner(name: str) -> tuple[str, tuple[int, str] | None]:
    """(sha256, (pid, host) of the process that set it aside, or None for a name without them)."""
    parts = name[len(GC_ASIDE) :].split(".", 3)
    if len(parts) == 4 and parts[1].isdigit():
        return parts[0], (int(parts[1]), parts[3])
    return parts[0], None


def _gone(owner: tuple[int, str] | None) -> bool:
    """Whether the process that set a file aside is known to be gone: it ran on this host, is not this process (whose
    collection may be running), and no process has its pid. A pid taken again since keeps the file for the time rule."""
    if owner is None or owner[1] != _HOST or owner[0] == os.getpid():
        return False
    try:
        os.kill(owner[0], 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: a process of another user has that pid
        return False
    return False


def _claim(target: Path) -> bool:
    """Whether ``target`` is in the store, refreshing its modification time when it is: "a row is about to name it",
    which keeps a garbage collection running meanwhile from deleting it (BlobStore.remove_unused). False when it is
    not there, went at this moment, or its time cannot be changed: the caller writes it (over it, atomically)."""
    try:
        os.utime(target)
    except FileNotFoundError:
        return False
    except OSError:  # not ours to touch (EPERM: the HR app wrote it): the caller puts its own copy over it, new
        return False
    return True


def _fsync_directory(path: Path) -> None:
    """Make the entries of a directory durable (a rename into it, a file or directory created in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_file(directory: Path, prefix: str, data: bytes) -> Path:
    """A new file in ``directory`` (name ``prefix`` + a random part) holding ``data``, fsynced, mode 0640; nothing is
    left behind when writing fails."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, 0o640)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
