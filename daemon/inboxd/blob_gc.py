"""Attachment garbage collection: delete the files of the attachment store that nothing names any more.

A file is in use while a mail_attachments row has its sha256, or a mail_outbox row lists it among its attachments (the
HR app's, any status: a failed row may be sent again). Files get orphaned when the HR app deletes rows, when a
`contacts forget` or `disconnect --purge` was interrupted between its commit and its file deletions, or when a row was
rolled back after its file was moved in. A file modified within GRACE is kept whatever the rows say: a sync moves a
file into the store (or claims one already there, refreshing its time) before it commits the row that names it, and
the HR app writes an outbox attachment's file before its row.

`inboxd attachments gc [--dry-run]`, and `inboxd run` once a day (GcSchedule). The decision (collectable) is pure;
the store's files and the rows are read in chunks of CHUNK, so memory stays flat with millions of files.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable, Iterator
from datetime import timedelta

import sqlalchemy as sa
import structlog

from inboxd.blobs import BlobStore, StoredFile
from inboxd.clock import Clock
from inboxd.models import MailAttachment, MailOutbox

log = structlog.get_logger(__name__)

attachments_t = MailAttachment.__table__  # type: ignore[attr-defined]
outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]

GRACE = timedelta(hours=1)  # a file modified this recently is kept: its row may not be committed yet
GC_INTERVAL = timedelta(days=1)  # how often `inboxd run` collects
GC_FIRST_DELAY = timedelta(minutes=10)  # and the first time after it starts: never in `run --once` or a restart loop
CHUNK = 500
_SHA256_IN_TEXT = re.compile(r"[0-9a-fA-F]{64}")


@dataclasses.dataclass
class GcReport:
    dry_run: bool
    files_checked: int = 0
    files_deleted: int = 0  # (or that would be, in a dry run)
    bytes_freed: int = 0
    files_recent: int = 0  # unnamed, but modified within GRACE: kept for now
    files_failed: int = 0  # could not be deleted (permissions): logged once, counted
    temporary_deleted: int = 0  # left by a put that died before its rename (.tmp-*), older than GRACE
    files_restored: int = 0  # set aside by a collection that died before putting them back (restore_abandoned)

    def as_dict(self) -> dict[str, int | bool]:
        return dataclasses.asdict(self)


class GcSchedule:
    """When `inboxd run` collects: GC_FIRST_DELAY after start, then every GC_INTERVAL, never two at once."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._due = clock.monotonic() + GC_FIRST_DELAY.total_seconds()

    def take(self, *, running: bool) -> bool:
        """Whether to start a collection now (and if so, the next is GC_INTERVAL away)."""
        now = self._clock.monotonic()
        if running or now < self._due:
            return False
        self._due = now + GC_INTERVAL.total_seconds()
        return True


def collectable(files: Iterable[StoredFile], in_use: set[str], *, cutoff: float) -> tuple[list[StoredFile], int]:
    """The files no row names and not modified after ``cutoff`` (seconds since the epoch), and how many unnamed ones
    are too recent to tell."""
    unnamed = [f for f in files if f.sha256 not in in_use]
    old = [f for f in unnamed if f.mtime <= cutoff]
    return old, len(unnamed) - len(old)


def collect_garbage(
    engine: sa.Engine, blobs: BlobStore, *, now: float, grace: timedelta = GRACE, dry_run: bool = False
) -> GcReport:
    """Delete (or, with ``dry_run``, count) the store's files that no row names, older than ``grace`` at ``now``."""
    report = GcReport(dry_run=dry_run)
    cutoff = now - grace.total_seconds()
    if not dry_run:
        report.files_restored = restore_abandoned(blobs)
    report.temporary_deleted = blobs.sweep_temporary(unchanged_since=cutoff, dry_run=dry_run)
    with engine.connect() as conn:
        in_outbox = outbox_shas(conn)
    for chunk in _chunked(blobs.stored_files(), CHUNK):
        report.files_checked += len(chunk)
        with engine.connect() as conn:
            named = attachment_shas_among(conn, [f.sha256 for f in chunk])
        doomed, recent = collectable(chunk, named | in_outbox, cutoff=cutoff)
        report.files_recent += recent
        for stored in doomed:
            if dry_run:
                report.files_deleted += 1
                report.bytes_freed += stored.size
                continue
            # the outbox again, for this file, just before it goes: the HR app may have named it meanwhile (it
            # writes the file anew first, which remove_unused honours; this covers one that did not)
            with engine.connect() as conn:
                if outbox_shas_among(conn, [stored.sha256]):
                    continue
            if _remove(blobs, stored.sha256, cutoff, report):
                report.files_deleted += 1
                report.bytes_freed += stored.size
    return report


def restore_abandoned(blobs: BlobStore) -> int:
    """BlobStore.restore_abandoned, logged (``store.attachments_restored``, ``store.attachment_restore_failed``);
    never raises OSError: the caller's sweep or collection goes on. Returns how many files went back."""
    try:
        restored, failed = blobs.restore_abandoned()
    except OSError as exc:  # the staging directory itself unreadable
        log.warning("store.attachment_restore_failed", error=exc.strerror or type(exc).__name__)
        return 0
    if restored:  # a collection died between moving a file aside and deciding on it
        log.warning("store.attachments_restored", files=restored)
    if failed:
        log.warning("store.attachment_restore_failed", files=failed)
    return restored


def _remove(blobs: BlobStore, sha256: str, cutoff: float, report: GcReport) -> bool:
    """One file; a failure (permissions, a file gone meanwhile) is counted and the collection goes on."""
    try:
        return blobs.remove_unused(sha256, unchanged_since=cutoff)
    except OSError as exc:
        report.files_failed += 1
        if report.files_failed == 1:  # one line per run: the rest are counted
            log.warning("store.attachment_gc_file_failed", error=exc.strerror or type(exc).__name__)
        return False


def outbox_shas_among(conn: sa.Connection, shas: list[str]) -> set[str]:
    """Which of ``shas`` some mail_outbox row names now (its attachments' text, lower-cased, contains it)."""
    text = sa.func.lower(sa.cast(outbox_t.c.attachments, sa.Text))
    return {
        sha256
        for sha256 in shas
        if conn.execute(sa.select(outbox_t.c.id).where(text.contains(sha256)).limit(1)).first() is not None
    }


def attachment_shas_among(conn: sa.Connection, shas: list[str]) -> set[str]:
    """Which of ``shas`` a mail_attachments row names."""
    column = attachments_t.c.sha256
    return set(conn.execute(sa.select(column).distinct().where(column.in_(shas))).scalars())


def outbox_shas(conn: sa.Connection) -> set[str]:
    """Every sha256 the mail_outbox rows' attachments name: the JSON read as text, so that a row whose JSON cannot
    be parsed (SQLite keeps any text) still protects what it names."""
    text = sa.cast(outbox_t.c.attachments, sa.Text)
    found: set[str] = set()
    for value in conn.execute(sa.select(text).where(outbox_t.c.attachments.is_not(None))).scalars():
        found.update(sha.lower() for sha in _SHA256_IN_TEXT.findall(value or ""))
    return found


def _chunked(items: Iterable[StoredFile], size: int) -> Iterator[list[StoredFile]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
