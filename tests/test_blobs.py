"""The attachment store's durability order: a file's bytes are fsynced before it is renamed into place, and the
directory it was renamed into, and the store's root, after the rename (before put returns, or adopt_all's wait
does: the caller commits the rows naming the file after that). The calls are recorded by the fs_calls fixture
(os.replace and os.fsync wrapped, the real ones still run); a power loss itself cannot be simulated here."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from inboxd.blobs import STAGING, BlobStore


def _digests(n: int) -> dict[str, bytes]:
    return {hashlib.sha256(b"attachment %d" % i).hexdigest(): b"attachment %d" % i for i in range(n)}


def _synced_after(fs_calls: list[tuple[str, str]], path: Path, directory: Path) -> bool:
    """Whether ``directory`` was fsynced after ``path`` was renamed into place."""
    renamed = fs_calls.index(("replace", str(path)))
    return ("fsync", str(directory)) in fs_calls[renamed + 1 :]


def test_adopt_all_syncs_each_directory_and_the_root_after_the_renames(
    tmp_path: Path, fs_calls: list[tuple[str, str]]
) -> None:
    root = tmp_path / "blobs"
    store = BlobStore(root)
    data = _digests(40)  # spread over many <sha256[0:2]> directories
    names = store.stage_all(data.items())()
    staged = [(sha256, names[sha256]) for sha256 in data]
    assert all(("fsync", str(root / STAGING / name)) in fs_calls for name in names.values()), "bytes fsynced first"
    fs_calls.clear()

    stored, durable = store.adopt_all(staged)
    assert stored == set(data)
    durable()
    for sha256 in data:
        target = store.path(sha256)
        assert store.read(sha256) == data[sha256]
        assert _synced_after(fs_calls, target, target.parent), f"{target.parent} not fsynced after the rename"
        assert _synced_after(fs_calls, target, root), "the root (new <sha256[0:2]> directories) not fsynced"
    directories = {store.path(sha256).parent for sha256 in data}
    assert len(directories) > 10
    assert sum(1 for kind, _ in fs_calls if kind == "fsync") == len(directories) + 1, "each directory once"
    assert list((root / STAGING).iterdir()) == []


def test_a_file_already_in_place_has_its_directories_synced_again(
    tmp_path: Path, fs_calls: list[tuple[str, str]]
) -> None:
    """A retried batch finds files an earlier attempt moved (that attempt may have died before its fsyncs): they
    count as stored and their directories are fsynced again; a swept staged file is not stored and syncs nothing."""
    root = tmp_path / "blobs"
    store = BlobStore(root)
    data = _digests(2)
    kept, swept = list(data)
    names = store.stage_all(data.items())()
    os.rename(root / STAGING / names[kept], _make_parent(store.path(kept)))  # moved, not synced
    (root / STAGING / names[swept]).unlink()
    fs_calls.clear()

    assert store.adopt(kept, names[kept])
    assert sorted(fs_calls) == [("fsync", str(root)), ("fsync", str(store.path(kept).parent))]
    fs_calls.clear()
    assert not store.adopt(swept, names[swept])
    assert not store.has(swept)
    assert fs_calls == []


def test_put_syncs_the_directory_and_the_root_after_the_rename(tmp_path: Path, fs_calls: list[tuple[str, str]]) -> None:
    root = tmp_path / "blobs"
    store = BlobStore(root)
    (sha256, data), *_ = _digests(1).items()
    target = store.put(sha256, data)
    renamed = next(i for i, call in enumerate(fs_calls) if call[0] == "replace")
    assert fs_calls[renamed] == ("replace", str(target))
    assert fs_calls[renamed - 1][0] == "fsync" and fs_calls[renamed - 1][1].startswith(str(target.parent) + "/.tmp-")
    assert fs_calls[renamed + 1 :] == [("fsync", str(target.parent)), ("fsync", str(root))]
    fs_calls.clear()
    assert store.put(sha256, data) == target
    assert fs_calls == [("fsync", str(target.parent)), ("fsync", str(root))], "not written again, synced again"


def _make_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
