"""A private Dovecot for B6: the stack's rendered dovecot.conf with its own base_dir, ports and logs, and a higher
imap-login process_limit, over the same mail directories and the same OAuth server.

Why: in the stack's high-security login mode every STARTTLS session keeps its imap-login process as the TLS proxy,
and imap-login inherits default_process_limit = 100, so 200 IDLE connections cannot all be up (Dovecot logs
"service(imap-login): process_limit (100) reached"). tests/mailstack/ is not the benchmark's to change.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from live_common import MailStack, free_port, wait_until

# 500 + lmtp 100 + imap-urlauth-login 100 stays under auth's and anvil's client_limit of 1000 (no doveconf warning)
LOGIN_PROCESS_LIMIT = 500


def render(stack: MailStack, directory: Path, imap_port: int, imaps_port: int, lmtp_port: int) -> Path:
    """The stack's dovecot.conf moved to `directory` and to the given ports, with the imap-login limit raised."""
    text = (stack.root / "dovecot.conf").read_text()
    for key, value in (
        ("base_dir", directory / "run"),
        ("state_dir", directory / "state"),
        ("instance_name", f"inboxd-bench-{os.getpid()}"),
        ("log_path", directory / "dovecot.log"),
        ("info_log_path", directory / "dovecot.log"),
        ("debug_log_path", directory / "dovecot.log"),
    ):
        text, found = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
        if not found:
            raise RuntimeError(f"{stack.root / 'dovecot.conf'} has no {key} line")
    for old, new in ((stack.imap_port, imap_port), (stack.imaps_port, imaps_port), (stack.lmtp_port, lmtp_port)):
        text = text.replace(f"port = {old}\n", f"port = {new}\n")
    text = text.replace(
        "service imap-login {\n", f"service imap-login {{\n  process_limit = {LOGIN_PROCESS_LIMIT}\n", 1
    )
    for sub in ("run", "state"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    path = directory / "dovecot.conf"
    path.write_text(text)
    return path


@contextlib.contextmanager
def private_dovecot(stack: MailStack, directory: Path) -> Iterator[MailStack]:
    """Run it; yields `stack` with its IMAP ports pointed at the private instance; stops it by its master pid."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = free_port(), free_port(), free_port()
    config = render(stack, directory, *ports)
    pid_file = directory / "run" / "master.pid"
    # the master forks into the background: no pipes, or run() would wait for the daemon's end of them
    with (directory / "start.log").open("wb") as out:
        subprocess.run(  # noqa: S603 (the installed dovecot)
            ["dovecot", "-c", str(config)],  # noqa: S607
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=30,
        )
    master = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, "dovecot master.pid"))
    try:
        wait_until(lambda: _listening(ports[0]), 10, f"private dovecot on port {ports[0]}")
        yield replace(stack, imap_port=ports[0], imaps_port=ports[1], lmtp_port=ports[2])
    finally:
        os.kill(master, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not Path(f"/proc/{master}").exists() or _zombie(master), 15, "dovecot to stop")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True
