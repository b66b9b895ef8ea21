"""Attachment bytes, content-addressed by sha256 under one directory the HR app can read.

Layout: <attachments_dir>/<sha256[0:2]>/<sha256>; files are written once, atomically, and never modified.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# put_all's writers: file writes and fsyncs release the GIL, and the filesystem commits concurrent fsyncs together
_WRITERS = 8


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
        """Store bytes under their digest (verified); a second put of the same bytes is a no-op."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("attachment bytes do not match their sha256")
        return self.put_hashed(sha256, data)

    def put_hashed(self, sha256: str, data: bytes) -> Path:
        """put() for bytes whose digest the caller computed itself from these very bytes (the parser does): the
        same write, without hashing them a second time."""
        target = self.path(sha256)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o640)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def put_all(self, blobs: Iterable[tuple[str, bytes]], *, hashed: bool = False) -> Callable[[], None]:
        """Start storing many (sha256, bytes) at once, in writer threads; returns the wait: it returns once every
        file is durable and raises the first failure. A sync stores a batch's attachments this way while it writes
        the batch's rows, and waits before the rows (which say the files exist) are committed; a parser worker
        before it answers (``hashed``: it computed the digests from these bytes itself, see put_hashed)."""
        unique = dict(blobs)
        if not unique:
            return lambda: None
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_WRITERS, thread_name_prefix="inboxd-blobs")
            put = self.put_hashed if hashed else self.put
            futures = [self._pool.submit(put, sha256, data) for sha256, data in unique.items()]

        def wait() -> None:
            for future in futures:
                future.result()

        return wait

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()
