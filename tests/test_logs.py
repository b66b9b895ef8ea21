"""Logging setup: the level the config names is the level that filters (every one of them), JSON lines off a TTY."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from inboxd import logs
from inboxd.config import LOG_LEVELS


@pytest.mark.parametrize("level", LOG_LEVELS)
def test_each_configured_level_drops_the_events_below_it(level: str) -> None:
    """`log_level = "critical"` was accepted by the config but logged at info (it was missing from the map)."""
    out = io.StringIO()
    logs.configure(level, stream=out, json=True)
    log = structlog.get_logger("test")
    for name in LOG_LEVELS:
        getattr(log, name)(f"event.{name}")
    logged = [json.loads(line)["level"] for line in out.getvalue().splitlines()]
    threshold = logging.getLevelNamesMapping()[level.upper()]
    assert logged == [n for n in LOG_LEVELS if logging.getLevelNamesMapping()[n.upper()] >= threshold]
    assert logged[0] == level


def test_an_unknown_level_is_an_error_not_info() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        logs.configure("loud", stream=io.StringIO(), json=True)
