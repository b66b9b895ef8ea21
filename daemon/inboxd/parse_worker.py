"""A parser worker process (see inboxd.parsing): ``python -m inboxd.parse_worker DAEMON_PID``.

It reads pickled requests (a chunk of (UID, raw body), the attachment size limit and the blob store's directory or
None) from its stdin and writes each answer, parse_chunk's list, pickled to its stdout; it exits at the end of its
input or as soon as the daemon is gone. With a directory, the attachments' bytes are staged there (durably) before
the answer goes, and the answer names the staged files instead of carrying the bytes (stash_attachments). It imports
inboxd.parse and inboxd.blobs and nothing more: no structlog, no daemon, no multiprocessing (what a worker imports is
memory it holds for the daemon's lifetime).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from inboxd.blobs import BlobStore
from inboxd.errors import UnparseableMessage
from inboxd.parse import AttachmentPart, ParsedMessage, parse_message
from inboxd.pipe_io import PipeReader, PipeWriter

ParseOutcome = ParsedMessage | UnparseableMessage
Answer = list[tuple[int, ParsedMessage | str]]  # what a worker sends back: UID, and the message or the reason
READY = b"R"  # the worker's first byte on its stdout, once it has imported what it needs, before any answer


def parse_all(bodies: Mapping[int, bytes], max_attachment_bytes: int) -> dict[int, ParseOutcome]:
    outcomes: dict[int, ParseOutcome] = {}
    for uid, raw in bodies.items():
        try:
            outcomes[uid] = parse_message(raw, max_attachment_bytes=max_attachment_bytes)
        except UnparseableMessage as exc:
            outcomes[uid] = exc
    return outcomes


def parse_chunk(bodies: list[tuple[int, bytes]], max_attachment_bytes: int) -> Answer:
    """Parse, with an unparseable body's reason as a plain string (simple to send back)."""
    return [
        (uid, outcome if isinstance(outcome, ParsedMessage) else outcome.message)
        for uid, outcome in parse_all(dict(bodies), max_attachment_bytes).items()
    ]


def stash_attachments(answer: Answer, blobs: BlobStore) -> Answer:
    """Stage the answer's attachment bytes in ``blobs`` (BlobStore.stage_all: written and fsynced) and return it
    with each staged part carrying its staged file's name and no bytes: they no longer travel back through the pipe,
    nor get hashed and written again in the daemon, whose sync thread is the busiest. The daemon moves each file into
    place just before it commits the rows that name it; a run it never stores leaves the files in staging, out of
    the store, until they are swept. When a write fails (a full disk, permissions) the answer goes back unchanged,
    bytes and all, and the daemon's own write meets the failure and reports it."""
    try:
        staged = blobs.stage_all(
            (a.sha256, a.data) for _, m in answer if isinstance(m, ParsedMessage) for a in m.attachments if a.data
        )()
    except (OSError, ValueError):
        return answer
    return [(uid, _without_bytes(m, staged) if isinstance(m, ParsedMessage) else m) for uid, m in answer]


def _without_bytes(message: ParsedMessage, staged: dict[str, str]) -> ParsedMessage:
    if not any(a.data for a in message.attachments):
        return message
    return dataclasses.replace(message, attachments=tuple(_stashed(a, staged) for a in message.attachments))


def _stashed(part: AttachmentPart, staged: dict[str, str]) -> AttachmentPart:
    return dataclasses.replace(part, data=b"", staged=staged[part.sha256]) if part.data else part


def exit_with(daemon_pid: int) -> None:
    """A worker's initializer: exit as soon as the daemon is gone. It may die by SIGKILL (the OOM killer, a
    `kill -9`) and never shut the pool down, and a worker waiting for work would wait forever."""

    def watch() -> None:
        try:
            handle = os.pidfd_open(daemon_pid)  # readable once that process has exited (Linux 5.3)
        except (AttributeError, OSError):
            while os.getppid() == daemon_pid:  # started by the daemon: re-parented when it dies
                time.sleep(1)
        else:
            select.select([handle], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="inboxd-watch-daemon", daemon=True).start()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the daemon, which closes our stdin
    exit_with(int(argv[0]))
    # the raw descriptors, not sys.stdin/sys.stdout's buffered objects (inboxd.pipe_io says why)
    answers_fd = sys.stdout.fileno()
    requests, answers = PipeReader(sys.stdin.fileno()), PipeWriter(answers_fd)
    sys.stdout = sys.stderr  # the answer pipe carries answers only
    os.write(answers_fd, READY)  # imported and listening: the daemon's time limits start from here
    blobs: BlobStore | None = None
    while True:
        try:
            chunk, max_attachment_bytes, blob_dir = pickle.load(requests)  # noqa: S301 (the daemon's own requests)
        except EOFError:
            return 0
        answer = parse_chunk(chunk, max_attachment_bytes)
        if blob_dir is not None:
            if blobs is None or blobs.root != Path(blob_dir):
                blobs = BlobStore(Path(blob_dir))
            answer = stash_attachments(answer, blobs)
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
