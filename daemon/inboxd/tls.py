"""TLS for every connection inboxd opens (IMAP and SMTP): certificates and host names are always verified.

`ca_file` only adds a trusted CA (a self-signed test server or a corporate CA); it never turns verification off.
One context per CA file is shared by every connection (a context holds the parsed system CA store, ~0.8 MB: 200
IDLE connections with a context each cost 165 MB); a CA file changed on disk gets a new one.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path


def verified_context(ca_file: Path | None) -> ssl.SSLContext:
    if ca_file is None:
        return _context(None, 0)
    try:
        changed = ca_file.stat().st_mtime_ns
    except OSError:
        changed = 0  # load_verify_locations reports the missing file
    return _context(str(ca_file), changed)


@functools.lru_cache(maxsize=16)
def _context(ca_file: str | None, _changed: int) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context
