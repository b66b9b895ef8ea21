"""Shared fixtures: the loopback mail stack (session-scoped) and the harness import path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ on sys.path makes the harness package importable as `harness` (pyproject stays untouched)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MailStack

# database fixtures (engine/store over SQLite and PostgreSQL) live in tests/dbs.py
pytest_plugins = ["dbs"]


@pytest.fixture(scope="session")
def mailstack() -> MailStack:
    """The running loopback Dovecot/Postfix/OAuth stack; started once per session if it is not up."""
    return MailStack.start()
