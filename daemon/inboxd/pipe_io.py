"""Pickles over a pipe between the daemon and its parser workers, read and written on the raw descriptor.

Python's buffered pipe objects (what subprocess and sys.stdin/stdout give) lost or reordered bytes when either
process was stopped and continued mid-transfer (SIGSTOP/SIGCONT: Ctrl-Z, `kill -STOP`, a debugger or py-spy
attaching): the next pickle.load met garbage ("invalid load key") or waited forever for bytes that never came. These
two file objects do what pickle needs with os.write/os.readv loops that account for every byte: a short write goes
on from where it stopped, a short read goes on until the count asked for or the end of the input.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select

Buffer = bytes | bytearray | memoryview


# A run of bodies is megabytes: through Linux's default 64 KiB pipe each run crossed in thousands of writes, each
# waking the reader (and the writer again when the pipe had drained). 1 MiB is the most an unprivileged process may
# ask for (/proc/sys/fs/pipe-max-size): 560 MB through a pipe took 0.9-1.2 CPU-s for both ends, 0.7-0.8 with it.
PIPE_SIZE = 1 << 20


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Ask for a ``size`` byte pipe buffer (Linux's F_SETPIPE_SZ). Best effort: elsewhere, or past the user's pipe
    quota (EPERM), the pipe keeps its size and only the number of writes differs."""
    with contextlib.suppress(AttributeError, OSError):  # F_SETPIPE_SZ is Linux's
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


def readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has something to read (or its end) within ``timeout`` seconds. poll, not select: select
    fails on descriptors past 1023, which a daemon with hundreds of IMAP connections reaches."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class PipeWriter:
    """A file object for pickle.dump: every byte of each write reaches the pipe, in order."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: Buffer) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            view = view[os.write(self._fd, view) :]
        return total


class PipeReader:
    """A file object for pickle.load: read(n) and readinto(buffer) return less than asked for only at the end of
    the input (pickle reports that as truncated data or EOFError)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            count = os.readv(self._fd, [view[done:]])
            if count == 0:
                break
            done += count
        return done

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            chunks = []
            while chunk := os.read(self._fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        buffer = bytearray(size)
        done = self.readinto(buffer)
        del buffer[done:]
        return bytes(buffer)

    def readline(self) -> bytes:
        """Only text-protocol pickles read lines; ours are binary, so this is seldom called: byte by byte."""
        line = bytearray()
        while not line.endswith(b"\n") and (byte := os.read(self._fd, 1)):
            line += byte
        return bytes(line)
