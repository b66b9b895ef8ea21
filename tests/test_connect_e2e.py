"""The whole connect flow as a recruiter lives it, against a running `inboxd run`: the HR app's "Connect" button
opens /connect/start in a real (headless Chromium) browser, the consent page approves, the browser lands back on
the HR app, and the mailbox's mail reaches the database within seconds. Then a disconnect stops it at once."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import sqlalchemy as sa

from harness import MailStack, make_message, wait_for
from harness.browser import Browser
from harness.config import write_stack_config
from inboxd import db

pytestmark = pytest.mark.mailstack
INBOXD = str(Path(sys.executable).with_name("inboxd"))
SCOPES = '["https://mail.google.com/", "openid", "email"]'


class HrApp:
    """The HR app's page the browser is sent back to; records what it was told."""

    def __init__(self) -> None:
        self.hits: list[dict[str, str]] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/favicon.ico":
                    hits.append({k: v[0] for k, v in parse_qs(url.query).items()})
                body = b"<!doctype html><title>HR app</title><p>Candidate profile</p>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def hr_app() -> Iterator[HrApp]:
    app = HrApp()
    yield app
    app.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def count(engine: sa.Engine, email: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM mail_messages m JOIN mail_accounts a ON a.id = m.account_id "
                    "WHERE a.email = :e"
                ),
                {"e": email},
            ).scalar_one()
        )


def test_connect_in_a_browser_then_mail_syncs_and_disconnect_stops_it(
    tmp_path: Path, db_url: str, mailstack: MailStack, hr_app: HrApp, browser: Browser
) -> None:
    port = free_port()
    oauth = mailstack.oauth_url
    config = write_stack_config(
        tmp_path,
        db_url,
        mailstack,
        sync_extra='interval = "1h"',
        extra=(
            f'auth_uri = "{oauth}/authorize"\nrevoke_uri = "{oauth}/revoke"\nscopes = {SCOPES}\n'
            f'[http]\nlisten = "127.0.0.1:{port}"\nreturn_to_origins = ["{hr_app.origin}"]\n'
        ),
    )
    env = {"INBOXD_CONFIG": str(config), "PATH": "/usr/bin:/bin"}
    subprocess.run([INBOXD, "secrets", "init"], env=env, check=True, capture_output=True)
    recruiter = mailstack.new_user("browser")
    mailstack.deliver(recruiter, make_message("Cand <cand@example.org>", recruiter, "my application", "hello"))
    engine = db.create_engine(db_url)
    log = (tmp_path / "inboxd.log").open("w")
    proc = subprocess.Popen([INBOXD, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _listening(port), timeout=20, what="inboxd's HTTP listener")
        start = f"http://127.0.0.1:{port}/connect/start?" + urlencode(
            {"email": recruiter, "return_to": f"{hr_app.origin}/candidates/7", "hr_user_ref": "rec-7"}
        )
        browser.open(start)
        landed = browser.wait_for_url(f"{hr_app.origin}/candidates/7", timeout=20)
        assert "Candidate profile" in browser.page_text()
        assert hr_app.hits == [{"inboxd_email": recruiter, "inboxd_status": "connected"}], landed

        # the running daemon notices the new account and syncs it within seconds, no restart
        wait_for(lambda: count(engine, recruiter) == 1, timeout=30, what="the new mailbox's mail stored")

        disconnect = subprocess.run(
            [INBOXD, "disconnect", recruiter], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert disconnect.returncode == 0, disconnect.stderr
        assert "provider revocation: revoked" in disconnect.stdout
        mailstack.deliver(recruiter, make_message("Cand <cand@example.org>", recruiter, "after disconnect", "x"))
        # the daemon drops the account (IDLE watcher stopped, no cycle syncs it); the new mail never arrives
        wait_for(lambda: "idle.stopped" in (tmp_path / "inboxd.log").read_text(), timeout=20, what="IDLE stopped")
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        assert count(engine, recruiter) == 1
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT enabled, state FROM mail_accounts WHERE email = :e"), {"e": recruiter}
            ).one()
        assert (bool(row.enabled), row.state) == (False, "disabled")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        engine.dispose()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
