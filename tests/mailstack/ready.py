#!/usr/bin/env python3
"""Readiness probe for the loopback mail stack: every listener answers with its banner.

Usage: ready.py [--timeout S] [--since NS_EPOCH]   exit 0 when all are up (prints the time taken), 1 otherwise.
"""

import argparse
import json
import socket
import sys
import time
import urllib.request

BANNERS = {("127.0.0.1", 11024): b"220", ("127.0.0.1", 11587): b"220", ("127.0.0.1", 11025): b"220"}
for addr in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
    BANNERS[(addr, 11143)] = b"* OK"
    BANNERS[(addr, 11993)] = None  # TLS from the first byte: a completed TCP connect is enough


def probe(endpoint, banner):
    if endpoint == "oauth":
        with urllib.request.urlopen("http://127.0.0.1:11080/healthz", timeout=1) as resp:
            return json.load(resp)["ok"] is True
    with socket.create_connection(endpoint, timeout=1) as s:
        if banner is None:
            return True
        s.settimeout(2)
        return s.recv(200).startswith(banner)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--since", type=int, help="start time (ns since epoch) to report the ready time against")
    a = ap.parse_args()
    t0 = a.since / 1e9 if a.since else time.time()
    pending = {"oauth": None, **BANNERS}
    deadline = time.time() + a.timeout
    while True:
        for endpoint, banner in list(pending.items()):
            try:
                if probe(endpoint, banner):
                    del pending[endpoint]
            except (OSError, ValueError):
                pass
        if not pending:
            print(f"mailstack ready after {time.time() - t0:.3f} s")
            return 0
        if time.time() >= deadline:
            print(f"mailstack not ready: {sorted(map(str, pending))}", file=sys.stderr)
            return 1
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
