"""TLS for every connection inboxd opens (IMAP and SMTP): certificates and host names are always verified.

`ca_file` only adds a trusted CA (a self-signed test server or a corporate CA); it never turns verification off.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def verified_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context
