"""The headless-Chromium harness (tests/harness/browser.py) follows a connect-like flow end to end: a 302 to a
consent page, a form posted by JavaScript or by a click, a 302 to a return_to page with a query string."""

from __future__ import annotations

import html
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness.browser import Browser, BrowserMissingError, launch

CONSENT_FIELDS = {"client_id": "inboxd-test-client", "state": "st-42", "redirect_uri": "", "decision": "allow"}


@dataclass
class Request:
    """One request as a test server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]


# a route answers (status, headers, body) for a request
Route = Callable[[Request], tuple[int, dict[str, str], str]]


@dataclass
class RecordingServer:
    """A stdlib HTTP server on a free 127.0.0.1 port, in a thread, that records every request it answers."""

    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(b"")

            def do_POST(self) -> None:
                self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

            def _answer(self, body: bytes) -> None:
                parts = urllib.parse.urlsplit(self.path)
                request = Request(
                    method=self.command,
                    path=parts.path,
                    query=urllib.parse.parse_qs(parts.query, keep_blank_values=True),
                    form=urllib.parse.parse_qs(body.decode(), keep_blank_values=True),
                )
                if parts.path != "/favicon.ico":  # Chromium asks every origin for one; not part of any flow
                    server.requests.append(request)
                route = server.routes.get((self.command, parts.path))
                status, headers, text = route(request) if route else (404, {}, "not found")
                payload = text.encode()
                self.send_response(status)
                for name, value in {"Content-Type": "text/html; charset=utf-8", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep pytest's output to the assertions

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)  # quick shutdown()
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def servers() -> Iterator[tuple[RecordingServer, RecordingServer, RecordingServer]]:
    """Three servers on different ports: A (the daemon's /connect/start), B (the OAuth consent), C (return_to)."""
    started = [RecordingServer(), RecordingServer(), RecordingServer()]
    yield started[0], started[1], started[2]
    for server in started:
        server.close()


def consent_page(fields: dict[str, str], *, auto_submit: bool) -> str:
    """An OAuth-consent-like page: a form of hidden inputs posted back to /authorize, by script or by a click."""
    inputs = "".join(
        f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
        for name, value in fields.items()
    )
    button = "" if auto_submit else '<button id="allow" type="submit">Allow</button>'
    script = "<script>document.getElementById('consent').submit();</script>" if auto_submit else ""
    return (
        "<!doctype html><title>Consent</title>"
        f'<form id="consent" method="post" action="/authorize">{inputs}{button}</form>{script}'
    )


def wire_connect_flow(
    a: RecordingServer, b: RecordingServer, c: RecordingServer, *, auto_submit: bool
) -> dict[str, str]:
    """Routes for A -> 302 -> B's consent form -> POST -> 302 -> C?code&state; returns the hidden fields B serves."""
    fields = {**CONSENT_FIELDS, "redirect_uri": f"{c.url}/return"}

    def start(_: Request) -> tuple[int, dict[str, str], str]:
        query = urllib.parse.urlencode({"client_id": fields["client_id"], "state": fields["state"]})
        return 302, {"Location": f"{b.url}/authorize?{query}"}, ""

    def authorize_get(_: Request) -> tuple[int, dict[str, str], str]:
        return 200, {}, consent_page(fields, auto_submit=auto_submit)

    def authorize_post(request: Request) -> tuple[int, dict[str, str], str]:
        query = urllib.parse.urlencode({"code": "code-7", "state": request.form["state"][0]})
        return 302, {"Location": f"{request.form['redirect_uri'][0]}?{query}"}, ""

    def return_to(request: Request) -> tuple[int, dict[str, str], str]:
        return (
            200,
            {},
            f"<!doctype html><title>HR app</title><p>Mailbox connected (state {request.query['state'][0]})</p>",
        )

    a.routes[("GET", "/connect/start")] = start
    b.routes[("GET", "/authorize")] = authorize_get
    b.routes[("POST", "/authorize")] = authorize_post
    c.routes[("GET", "/return")] = return_to
    return fields


def test_auto_submitted_consent_form_lands_on_return_to_with_code_and_state(
    browser: Browser, servers: tuple[RecordingServer, RecordingServer, RecordingServer]
) -> None:
    """A 302, a form that JavaScript posts, and a second 302 end at C with the query B chose and C saw the request."""
    a, b, c = servers
    fields = wire_connect_flow(a, b, c, auto_submit=True)

    browser.open(f"{a.url}/connect/start?account=7")
    final_url = browser.wait_for_url(f"{c.url}/return")

    assert final_url == f"{c.url}/return?code=code-7&state=st-42"
    assert [(r.method, r.path, r.query) for r in c.requests] == [
        ("GET", "/return", {"code": ["code-7"], "state": ["st-42"]})
    ]
    posts = [r for r in b.requests if r.method == "POST"]
    assert [r.form for r in posts] == [{name: [value] for name, value in fields.items()}]
    assert a.requests[0].query == {"account": ["7"]}
    assert "Mailbox connected (state st-42)" in browser.page_text()


def test_clicking_the_consent_button_posts_the_form_and_follows_the_redirect(
    browser: Browser, servers: tuple[RecordingServer, RecordingServer, RecordingServer]
) -> None:
    """Without a script the form waits for a click on its button; the click posts it and the flow ends at C."""
    a, b, c = servers
    fields = wire_connect_flow(a, b, c, auto_submit=False)

    browser.open(f"{a.url}/connect/start")
    assert browser.wait_for_url(f"{b.url}/authorize").startswith(f"{b.url}/authorize?")
    assert not c.requests  # nothing moves until the click

    browser.click("#allow")
    final_url = browser.wait_for_url(lambda url: url.startswith(c.url))

    assert urllib.parse.parse_qs(urllib.parse.urlsplit(final_url).query) == {"code": ["code-7"], "state": ["st-42"]}
    assert len(c.requests) == 1
    assert [r.form for r in b.requests if r.method == "POST"] == [{name: [value] for name, value in fields.items()}]


def test_wait_for_url_fails_naming_the_url_the_browser_is_at(
    browser: Browser, servers: tuple[RecordingServer, RecordingServer, RecordingServer]
) -> None:
    """A URL that never comes fails the test after the timeout and says where the browser got stuck."""
    a, b, c = servers
    wire_connect_flow(a, b, c, auto_submit=False)
    browser.open(f"{b.url}/authorize")

    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"waiting for the URL .*/never'; the browser is at http://127\.0\.0\.1"):
        browser.wait_for_url(f"{c.url}/never", timeout=0.3)
    assert time.monotonic() - started < 2


def test_missing_chromium_fails_the_fixture_with_a_message_naming_tests_run(tmp_path: Path) -> None:
    """Without the Debian packages the fixture fails (it never skips) and tells the reader to run tests/run."""
    with pytest.raises(BrowserMissingError, match=r"chromium not found: run tests/run"):
        Browser(chromium=tmp_path / "chromium")

    with pytest.raises(pytest.fail.Exception, match=r"chromedriver not found: run tests/run"):
        launch(chromedriver=tmp_path / "chromedriver")
