"""A headless Chromium for end-to-end tests that need a real browser (redirect chains, JavaScript, form posts).

Owns starting Debian's chromium through its chromedriver (installed by tests/run) and the ``browser`` fixture.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

PAGE_LOAD_TIMEOUT = 20.0

# A throwaway profile that talks to nothing but the pages a test opens: no first-run UI, sync, updates,
# safe-browsing or metrics traffic. --no-sandbox because tests run as root; --disable-dev-shm-usage because
# containers often have a 64 MB /dev/shm.
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--password-store=basic",
    "--no-proxy-server",  # every page under test is on loopback; an http_proxy in the environment must not apply
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
)


class BrowserMissingError(RuntimeError):
    """Chromium or chromedriver is not installed; tests/run installs both (Debian's chromium, chromium-driver)."""


def missing_binaries(chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER) -> list[Path]:
    """The browser binaries that are absent or not executable (empty when the harness can start)."""
    return [path for path in (chromium, chromedriver) if not (path.is_file() and os.access(path, os.X_OK))]


class Browser:
    """One headless Chromium with a fresh profile, driven through chromedriver; close() (or ``with``) ends it."""

    def __init__(self, *, chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER) -> None:
        missing = missing_binaries(chromium, chromedriver)
        if missing:
            names = ", ".join(str(path) for path in missing)
            raise BrowserMissingError(f"{names} not found: run tests/run, which installs chromium and chromium-driver")
        self._profile = tempfile.TemporaryDirectory(prefix="inboxd-chromium-", ignore_cleanup_errors=True)
        options = webdriver.ChromeOptions()
        options.binary_location = str(chromium)
        for arg in (*CHROMIUM_ARGS, f"--user-data-dir={self._profile.name}"):
            options.add_argument(arg)
        started = time.monotonic()
        try:
            # an explicit driver path keeps Selenium Manager (which downloads drivers) out of the picture
            self._driver = webdriver.Chrome(options=options, service=Service(executable_path=str(chromedriver)))
        except BaseException:
            self._profile.cleanup()
            raise
        self.startup_seconds = time.monotonic() - started
        self._driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The address of the page currently shown."""
        return str(self._driver.current_url)

    def open(self, url: str) -> None:
        """Navigate to ``url`` and return once its page (after any HTTP redirects) has loaded."""
        self._driver.get(url)

    def wait_for_url(self, expected: str | Callable[[str], bool], timeout: float = 15.0) -> str:
        """Return the current URL once it starts with ``expected`` (a prefix) or satisfies it (a predicate);
        fail the test after ``timeout`` s, naming the last URL seen (JavaScript redirects and auto-submitted
        forms land asynchronously)."""
        matches = expected if callable(expected) else lambda url: url.startswith(expected)
        deadline = time.monotonic() + timeout
        while True:
            url = self.url
            if matches(url):
                return url
            if time.monotonic() >= deadline:
                what = expected if isinstance(expected, str) else getattr(expected, "__name__", repr(expected))
                raise AssertionError(
                    f"timed out after {timeout} s waiting for the URL {what!r}; the browser is at {url}"
                )
            time.sleep(0.05)

    def page_text(self) -> str:
        """The visible text of the current page's body."""
        return str(self._driver.find_element(By.TAG_NAME, "body").text)

    def click(self, css_selector: str) -> None:
        """Click the first element matching ``css_selector`` (fails when there is none)."""
        self._driver.find_element(By.CSS_SELECTOR, css_selector).click()

    def close(self) -> None:
        """Quit Chromium and chromedriver and delete the profile; safe to call twice."""
        driver, self._driver = getattr(self, "_driver", None), None
        if driver is not None:
            with contextlib.suppress(WebDriverException):  # the browser already died; the profile still goes
                driver.quit()
        self._profile.cleanup()


def launch(*, chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER) -> Browser:
    """Start a Browser, failing the current test (never skipping it) when tests/run has not installed Chromium."""
    try:
        return Browser(chromium=chromium, chromedriver=chromedriver)
    except BrowserMissingError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A fresh headless Chromium per test, closed after it (see ``launch`` for a missing installation)."""
    with launch() as instance:
        yield instance
