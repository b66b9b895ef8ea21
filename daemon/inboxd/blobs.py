"""Attachment bytes, content-addressed by sha256 under one directory the HR app can read.

Layout: <attachments_dir>/<sha256[0:2]>/<sha256>; files are written once, atomically, and never modified.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

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

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()
