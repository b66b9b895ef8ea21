"""The fs_calls fixture: os.replace and os.fsync wrapped (the real ones still run) to record what was renamed where
and which file or directory was fsynced, in order, so tests can check the attachment store's durability order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def fs_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """("replace", target path) and ("fsync", path of the fd) in the order they happen; tests may append their own
    events (a commit) to the same list."""
    seen: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        seen.append(("replace", str(dst)))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen
