"""Logging setup: structlog events, JSON lines when not on a TTY (journald), readable console on a TTY.

Configured once by the CLI; library code only calls structlog.get_logger(__name__) and logs events with fields.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from inboxd.config import LOG_LEVELS

# every level the config accepts: one missing here ("critical" was) silently logged at info
_LEVELS: dict[str, int] = {name: logging.getLevelNamesMapping()[name.upper()] for name in LOG_LEVELS}


def configure(level: str = "info", *, stream: TextIO | None = None, json: bool | None = None) -> None:
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LOG_LEVELS)}")
    out = stream or sys.stderr
    as_json = (not out.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # imaplib/urllib3 debug output can carry AUTHENTICATE lines: keep library loggers at WARNING.
    logging.basicConfig(level=logging.WARNING, stream=out)
