"""What the benchmarks run against and how they measure: bench users on the loopback mail stack, fresh databases,
inboxd configs and commands, processes timed with their peak RSS, Dovecot's per-session byte counts.

The stack itself is tests/mailstack (started by bench/run); its endpoints and tokens come from tests/harness.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.mailstack import MailStack  # noqa: E402  (the tests' view of the stack: ports, tokens, doveadm)

PG_URL = os.environ.get("INBOXD_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# mbsync logs in with PLAIN: bench users get this password in the stack's rendered passwd-file
MBSYNC_PASSWORD = "bench-pass"  # noqa: S105 (a loopback test mailbox)


@dataclass(frozen=True, slots=True)
class Measured:
    """One process run: wall time, peak RSS of that process alone (wait4) and of it with all its descendants
    (sampled), exit code, stdout."""

    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    peak_tree_rss_mb: float = 0.0


class TreeRss:
    """Samples the summed VmRSS of a process and all its descendants every 0.1 s while it runs; ``peak_mb`` is the
    highest sum seen. inboxd's parser workers are processes of their own: wait4's ru_maxrss (GNU time's %M) is the
    largest single process, not what the machine gives the whole."""

    def __init__(self, pid: int) -> None:
        self._root = pid
        self.peak_mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(0.1):
            self.peak_mb = max(self.peak_mb, self._sample())

    def _sample(self) -> float:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                status = Path(entry.path, "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            pid, ppid = int(entry.name), int(fields.get("PPid", "0"))
            children.setdefault(ppid, []).append(pid)
            rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
        total, todo = 0, [self._root]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo += children.get(pid, [])
        return total / 1024


def measure(cmd: list[str], *, env: dict[str, str] | None = None, stderr: Path | None = None) -> Measured:
    """Run `cmd` to completion, timing it, with its own peak RSS.

    The RSS comes from GNU time (`%M`, its child's wait4 ru_maxrss), not from our own wait4: Linux carries the
    parent's high-water mark across fork+exec into the child's ru_maxrss, so a child of this ~90 MB process would
    never read below 90 MB. time's own footprint is ~2 MB.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.NamedTemporaryFile("r") as rss,
        stderr.open("ab") if stderr else open(os.devnull, "wb") as err,
    ):
        timed = ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd]
        started = time.perf_counter()
        process = subprocess.Popen(timed, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)  # noqa: S603
        tree = TreeRss(process.pid)  # GNU time (~2 MB) and everything under it
        returncode = process.wait()
        wall = time.perf_counter() - started
        tree.stop()
        out.seek(0)
        stdout = out.read().decode(errors="replace")
        # "Command exited with non-zero status N" comes first when it failed; %M is the last line
        peak_kb = int(rss.read().split()[-1])
    return Measured(wall, peak_kb / 1024, returncode, stdout, tree.peak_mb)


class Bench:
    """The loopback stack as the benchmarks use it, and a scratch directory per run."""

    def __init__(self, work: Path, cache: Path) -> None:
        self.stack = MailStack.start()  # already up (bench/run started it): returns in ~0.2 s
        self.work = work
        self.cache = cache
        self.python = str(REPO / ".venv" / "bin" / "python")
        self.inboxd = str(REPO / ".venv" / "bin" / "inboxd")
        self.doveadm = ["doveadm", "-c", str(self.stack.doveadm_conf)]

    @staticmethod
    def user(size: int) -> str:
        return f"bench-{size}@example.test"

    def home(self, user: str) -> Path:
        # the userdb in tests/mailstack/dovecot.conf: static, home=$MAILSTACK_ROOT/mail/%u
        return self.stack.root / "mail" / user

    # -- databases --------------------------------------------------------------------------------------------

    @contextmanager
    def database(self, kind: str, directory: Path) -> Iterator[str]:
        """A fresh, empty database URL: an SQLite file, or a new PostgreSQL schema (dropped afterwards)."""
        if kind == "sqlite":
            yield f"sqlite:///{directory / 'inboxd.db'}"
            return
        schema = "bench_" + uuid.uuid4().hex[:12]
        admin = sa.create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield f"{PG_URL}?options=-csearch_path%3D{schema}"
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()

    # -- inboxd -----------------------------------------------------------------------------------------------

    def write_config(self, directory: Path, db_url: str, *, scope: str) -> Path:
        """Like tests/harness/config.py's write_stack_config, with inboxd's default batch size."""
        s = self.stack
        path = directory / "inboxd.toml"
        path.write_text(f"""
state_dir = "{directory / "state"}"
[database]
url = "{db_url}"
[secrets]
key_file = "{directory / "secret.key"}"
[sync]
scope = "{scope}"
[providers.local]
kind = "imap"
imap_host = "{s.host}"
imap_port = {s.imap_port}
imap_tls = "starttls"
smtp_host = "{s.host}"
smtp_port = {s.submission_port}
smtp_tls = "starttls"
auth = "oauth2"
token_uri = "{s.token_uri}"
client_id = "{s.client_id}"
client_secret = "{s.client_secret}"
ca_file = "{s.ca_cert}"
timeout = 120
""")
        return path

    def connect(self, config: Path, user: str, *, contacts: tuple[str, ...] = ()) -> dict[str, str]:
        """`db upgrade`, `secrets init`, `accounts add` (a fresh refresh token); the HR app's contacts. Returns
        the environment that points inboxd at `config`."""
        env = {**os.environ, "INBOXD_CONFIG": str(config)}
        for args in (["db", "upgrade"], ["secrets", "init"]):
            subprocess.run([self.inboxd, *args], env=env, check=True, capture_output=True)  # noqa: S603
        token = config.parent / "refresh.token"
        token.write_text(self.stack.refresh_token(user))
        add = ["accounts", "add", user, "--provider", "local", "--refresh-token-file", str(token)]
        subprocess.run([self.inboxd, *add], env=env, check=True, capture_output=True)  # noqa: S603
        if contacts:
            url = _config_db_url(config)
            engine = sa.create_engine(url)
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES (:e)"), [{"e": c} for c in contacts])
            engine.dispose()
        return env

    def stored_messages(self, config: Path) -> int:
        engine = sa.create_engine(_config_db_url(config))
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(*) FROM mail_messages")).scalar_one()
        engine.dispose()
        return int(count)

    # -- mbsync -----------------------------------------------------------------------------------------------

    def allow_password_login(self, user: str) -> None:
        """Give `user` a PLAIN password for mbsync: appended to the passwd-file start.sh renders under
        $MAILSTACK_ROOT (Dovecot re-reads it when it changes; a stack restart renders it afresh)."""
        passwd = self.stack.root / "users.passwd"
        lines = passwd.read_text().splitlines()
        if not any(line.startswith(f"{user}:") for line in lines):
            with passwd.open("a") as out:
                out.write(f"{user}:{{PLAIN}}{MBSYNC_PASSWORD}::::::\n")

    def mbsync_config(self, directory: Path, user: str) -> Path:
        """mbsync at its defaults, except what a first run needs: create the local folders, keep state there."""
        maildir = directory / "maildir"
        maildir.mkdir(parents=True, exist_ok=True)
        s = self.stack
        path = directory / "mbsyncrc"
        # mbsync matches the certificate against DNS names only (its SAN has localhost, and 127.0.0.1 as an IP)
        path.write_text(f"""IMAPAccount bench
Host localhost
Port {s.imap_port}
User {user}
Pass {MBSYNC_PASSWORD}
SSLType STARTTLS
CertificateFile {s.ca_cert}

IMAPStore bench-far
Account bench

MaildirStore bench-near
Path {maildir}/
Inbox {maildir}/INBOX

Channel bench
Far :bench-far:
Near :bench-near:
Patterns *
Create Near
SyncState *
""")
        return path

    # -- Dovecot's view ---------------------------------------------------------------------------------------

    @property
    def dovecot_log(self) -> Path:
        return self.stack.root / "log" / "dovecot.log"

    def log_offset(self) -> int:
        return self.dovecot_log.stat().st_size

    def bytes_sent(self, user: str, offset: int, *, sessions: int = 1, timeout: float = 5.0) -> int:
        """Bytes Dovecot sent to `user`'s IMAP sessions that ended after `offset` in its log (the `out=` of
        each `Disconnected: Logged out` line: IMAP bytes before TLS), waiting for `sessions` of them."""
        pattern = re.compile(rf"imap\({re.escape(user)}\)<[^:]*: Info: Disconnected: .*\bout=(\d+)")
        deadline = time.monotonic() + timeout
        while True:
            with self.dovecot_log.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
            found = [int(m.group(1)) for m in pattern.finditer(text)]
            if len(found) >= sessions or time.monotonic() > deadline:
                return sum(found)
            time.sleep(0.1)


def _config_db_url(config: Path) -> str:
    match = re.search(r'^url = "([^"]+)"', config.read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1)


def scratch(parent: Path, name: str) -> Path:
    path = parent / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
