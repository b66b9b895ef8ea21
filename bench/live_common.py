"""What the live benchmarks (bench/live.py) share: a scratch database, an `inboxd run` process against the loopback
mail stack with its accounts, /proc readings of that process, and the result rows and percentiles they report.

Reuses tests/harness (MailStack, write_stack_config) so the benchmarks point inboxd at the stack the way tests do.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness.config import write_stack_config  # noqa: E402
from harness.mailstack import MailStack  # noqa: E402
from harness.messages import make_message  # noqa: E402
from inboxd import db  # noqa: E402
from inboxd.blobs import BlobStore  # noqa: E402
from inboxd.clock import SystemClock  # noqa: E402
from inboxd.crypto import SecretBox, init_key_file  # noqa: E402
from inboxd.store import Credential, Store  # noqa: E402

__all__ = ["MailStack", "make_message"]  # re-exported: the harness is importable only after the path above

INBOXD = str(Path(sys.executable).with_name("inboxd"))
PG_URL = os.environ.get("INBOXD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Result:
    """One reported number; `ok` is None when the metric has no target."""

    bench: str
    case: str
    metric: str
    value: float
    unit: str
    target: str | None = None
    ok: bool | None = None

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["value"] = None if math.isnan(self.value) else self.value  # JSON has no NaN
        return row


def percentile(values: Iterable[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_results(
    bench: str, case: str, name: str, seconds: list[float], targets: dict[str, float] | None = None
) -> list[Result]:
    """n, p50, p95 and max of `seconds` (reported in seconds); `targets` maps "p50"/"p95" to a limit."""
    targets = targets or {}
    rows = [Result(bench, case, f"{name} n", float(len(seconds)), "count")]
    for label, value in (
        ("p50", percentile(seconds, 50)),
        ("p95", percentile(seconds, 95)),
        ("max", max(seconds, default=math.nan)),
    ):
        limit = targets.get(label)
        rows.append(
            Result(
                bench,
                case,
                f"{name} {label}",
                round(value, 4),
                "s",
                f"<= {limit} s" if limit is not None else None,
                (value <= limit) if limit is not None else None,
            )
        )
    return rows


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- database ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(kind: str, directory: Path) -> Iterator[str]:
    """A migrated, empty database (SQLite file in `directory`, or a PostgreSQL schema dropped afterwards); its URL."""
    if kind == "sqlite":
        url = f"sqlite:///{directory / 'inboxd.db'}"
        engine = db.create_engine(url)
        db.upgrade(engine)
        engine.dispose()
        yield url
        return
    schema = "bench_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    try:
        engine = db.create_engine(url)
        db.upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# -- the daemon under test --------------------------------------------------------------------------------------


@dataclass
class Daemon:
    """An `inboxd run` subprocess and what it runs against."""

    proc: subprocess.Popen[bytes]
    store: Store
    directory: Path
    metrics_url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.directory / "inboxd.log"

    def metric(self, name: str, labels: str = "") -> float:
        """A sample from /metrics (0 when absent or not served yet), e.g.
        metric("inboxd_account_syncs_total", 'result="ok"')."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:  # noqa: S310 (our http://127.0.0.1)
                text = resp.read().decode()
        except OSError:  # the process is still starting
            return 0.0
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def assert_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"inboxd run exited with {self.proc.returncode}; log tail:\n{tail}")


def add_accounts(store: Store, stack: MailStack, users: Iterable[str]) -> None:
    """What `inboxd accounts add --provider local --refresh-token-file` does, in-process (200 CLI runs are slow)."""
    for user in users:
        store.add_account(user, "local", Credential("oauth2_refresh", stack.refresh_token(user)))


@contextlib.contextmanager
def running_daemon(
    stack: MailStack, db_url: str, users: list[str], *, directory: Path, sync_extra: str = 'interval = "1h"'
) -> Iterator[Daemon]:
    """`inboxd run` with provider `local` (STARTTLS, XOAUTH2, scope "all") and `users` connected; SIGTERM at the end."""
    port = free_port()
    config = write_stack_config(
        directory, db_url, stack, sync_extra=sync_extra, extra=f'[http]\nlisten = "127.0.0.1:{port}"'
    )
    key = directory / "secret.key"
    init_key_file(key)
    engine = db.create_engine(db_url)
    store = Store(
        engine,
        clock=SystemClock(),
        secret_box=SecretBox.from_key_file(key),
        blobs=BlobStore(directory / "state" / "attachments"),
    )
    add_accounts(store, stack, users)
    env = {**os.environ, "INBOXD_CONFIG": str(config)}
    with (directory / "inboxd.log").open("wb") as log:
        proc = subprocess.Popen([INBOXD, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 (our venv)
    daemon = Daemon(proc, store, directory, f"http://127.0.0.1:{port}/metrics")
    try:
        yield daemon
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        engine.dispose()


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"inboxd-bench-{prefix}-") as name:
        yield Path(name)


def wait_synced_and_idling(daemon: Daemon, accounts: int, *, imap_port: int, timeout: float) -> float:
    """Wait until every account had its first sync and the catch-up sync of its IDLE watcher (>= 2 ok syncs each),
    and one IMAP connection per account stays open (the watchers'), or two (a sync's, kept for the account's next
    sync: `sync.keep_session`); returns the seconds it took."""
    started = time.monotonic()

    def settled() -> bool:
        daemon.assert_alive()
        if daemon.metric("inboxd_account_syncs_total", 'result="ok"') < 2 * accounts:
            return False
        return accounts <= established(daemon.pid, imap_port) <= 2 * accounts

    wait_until(settled, timeout, f"{accounts} accounts synced and idling", interval=0.5)
    # stable: no sync connection opened in the meantime
    time.sleep(1.0)
    wait_until(settled, timeout, f"{accounts} accounts synced and idling (stable)", interval=0.5)
    return time.monotonic() - started


# -- /proc ------------------------------------------------------------------------------------------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def established(pid: int, remote_port: int | None = None) -> int:
    """ESTABLISHED TCP connections of `pid` (to `remote_port` if given), from /proc/<pid>/net/tcp{,6}."""
    inodes = _socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                remote, state, inode = fields[2], fields[3], fields[9]
                if state != "01" or inode not in inodes:
                    continue
                if remote_port is None or int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    count += 1
    return count


@dataclass(frozen=True)
class ProcSample:
    at: float  # monotonic seconds
    cpu_ticks: int  # utime + stime
    rss_kib: int
    threads: int
    fds: int


def proc_sample(pid: int) -> ProcSample:
    """`pid` and its children together (inboxd run's parser workers): what the service costs the host."""
    at = time.monotonic()
    ticks = rss = threads = fds = 0
    for one in (pid, *_children(pid)):
        try:
            with open(f"/proc/{one}/stat") as fh:
                # the command name may hold spaces: fields are counted after its closing parenthesis
                fields = fh.read().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{one}/status").read_text()
            count = len(os.listdir(f"/proc/{one}/fd"))
        except OSError:  # a child that just exited
            if one == pid:
                raise
            continue
        ticks += int(fields[11]) + int(fields[12])
        rss += int(re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
        threads += int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
        fds += count
    return ProcSample(at, ticks, rss, threads, fds)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def cpu_percent(first: ProcSample, last: ProcSample) -> float:
    """CPU time over wall time between two samples, in percent of one core."""
    return 100.0 * (last.cpu_ticks - first.cpu_ticks) / CLOCK_TICKS / max(last.at - first.at, 1e-9)
