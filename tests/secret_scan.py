"""A pytest plugin: at the end of the run, no token, code or password any OAuth server of the run minted may
appear in what the run logged — the captured output of every test (inboxd's log lines, CLI output) and every log
file the tests wrote under the run's temporary directory (inboxd subprocess logs). A hit fails the run and names
where, never the secret itself.

Secrets: every token and code the shared mail-stack OAuth server and each private one minted (GET /admin/issued),
the stack's OAuth client secret and the password user's password. Config files and key files are not logs; they
are not scanned.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from harness.mailstack import MAILSTACK_DIR, MailStack
from harness.oauth import ISSUED_BY_PRIVATE_SERVERS

LOG_SUFFIXES = (".log", ".err", ".out", ".stderr", ".stdout")
MAX_FILE = 50 * 1024 * 1024
OAUTH_URL = f"http://{MailStack.host}:{MailStack.oauth_port}"


def _static_secrets() -> set[str]:
    """The stack's OAuth client secret and the cleartext passwords of its password users."""
    found = {MailStack.client_secret}
    for line in (MAILSTACK_DIR / "users.passwd").read_text().splitlines():
        fields = line.split(":")
        if not line.startswith("#") and len(fields) > 1 and fields[1].startswith("{PLAIN}"):
            found.add(fields[1].removeprefix("{PLAIN}"))
    return found


_captured: list[tuple[str, str]] = []  # (where, text)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, text in report.sections:
        if text:
            _captured.append((f"{report.nodeid} ({name})", text))
    if report.failed and report.longreprtext:
        _captured.append((f"{report.nodeid} (failure report)", report.longreprtext))


def _issued_by_the_stack() -> set[str]:
    try:
        with urllib.request.urlopen(f"{OAUTH_URL}/admin/issued", timeout=10) as response:
            return set(json.load(response)["secrets"])
    except OSError:
        return set()  # the stack never started in this run: its tokens cannot be in any log


def _log_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and (p.suffix in LOG_SUFFIXES or "log" in p.name) and p.stat().st_size <= MAX_FILE
    ]


def find_leaks(secrets: set[str], texts: list[tuple[str, str]], files: list[Path]) -> list[str]:
    """Where each secret shows up; pure over its inputs (tested in test_secret_scan.py)."""
    wanted = sorted(s for s in secrets if len(s) >= 8)
    hits = []
    for where, text in texts:
        for secret in wanted:
            if secret in text:
                hits.append(f"{where}: a secret starting {secret[:4]!r}")
    for path in files:
        data = path.read_bytes()
        for secret in wanted:
            if secret.encode() in data:
                hits.append(f"{path}: a secret starting {secret[:4]!r}")
    return hits


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if getattr(session.config, "workerinput", None) is not None:
        return
    secrets = _issued_by_the_stack() | ISSUED_BY_PRIVATE_SERVERS | _static_secrets()
    factory = getattr(session.config, "_tmp_path_factory", None)
    root = factory.getbasetemp() if factory is not None else None
    leaks = find_leaks(secrets, _captured, _log_files(root) if root else [])
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaks:
        if reporter is not None:
            reporter.write_sep("=", "SECRETS IN LOGS", red=True)
            for leak in leaks[:50]:
                reporter.write_line(leak)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        reporter.write_line(
            f"secret scan: {len(secrets)} secrets, {len(_captured)} captured outputs, no secret in any log"
        )
