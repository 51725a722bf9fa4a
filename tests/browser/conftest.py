"""Browser tests: a real ``phasewatch serve`` and Debian's headless Chromium, driven by
playwright's Python package (``executable_path``; playwright's own browser download is
never used). Chromium missing is a failure that says how to install it, never a skip:
``.ci/run`` installs it.

Every page records its console errors, page errors and failed requests; a test asserts
on them where it says the page loads cleanly."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from tests.process.service_proc import ServiceProcess
from tests.support import snapshot, webhook_body

CHROMIUM = Path(os.environ.get("PHASEWATCH_CHROMIUM", "/usr/bin/chromium"))
HANDLER = "tests.browser.refusing_handler:refuse_until_allowed"
TOKEN = "dashboard-test-token-7f3a"  # the tests' own API token


# Module scope, not session: while playwright's sync API runs, its event loop is the
# running loop of this thread, and pytest-asyncio could not run the async tests after it.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium;"
            " .ci/run does it). Do not run `playwright install`.",
            pytrace=False,
        )
    # --no-sandbox: Chromium's sandbox cannot start as root (CI runs as root).
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
    yield browser
    browser.close()


@dataclass
class Service:
    """A running ``phasewatch serve`` with the refusing handler, and how to feed it."""

    proc: ServiceProcess
    allow: Path  # create it: the handler accepts from then on
    _events: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def url(self) -> str:
        return self.proc.url

    def post_task(self, task_id: str, phase: str, updated_at: int, **fields: Any) -> None:
        body = webhook_body(
            f"evt-{next(self._events)}", snapshot(task_id, phase, updated_at, **fields)
        )
        status = self.proc.post("/webhooks/livepeer", body)
        assert status == 200, status

    def get(self, path: str) -> dict[str, Any]:
        status, body = self.proc.get(path)
        assert status == 200, (status, body)
        return body


def _service(tmp_path: Path, **env: str) -> Iterator[Service]:
    allow = tmp_path / "allow"
    proc = ServiceProcess(
        tmp_path / "pw.db",
        {"PHASEWATCH_HANDLERS": HANDLER, "PHASEWATCH_TEST_ALLOW": str(allow), **env},
    ).start()
    try:
        yield Service(proc, allow)
    finally:
        proc.stop()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from _service(tmp_path)


@pytest.fixture
def token_service(tmp_path: Path) -> Iterator[Service]:
    yield from _service(tmp_path, PHASEWATCH_API_TOKEN=TOKEN)


@dataclass
class Watched:
    """A page, and what went wrong on it."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return [*self.console_errors, *self.page_errors, *self.failed_requests]


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    w = Watched(page)

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            w.console_errors.append(f"console: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda exc: w.page_errors.append(f"page error: {exc}"))
    page.on(
        "response",
        lambda r: w.failed_requests.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    page.on("requestfailed", lambda r: _request_failed(w, r.url, r.failure))
    try:
        yield w
    finally:
        context.close()


def _request_failed(w: Watched, url: str, failure: str | None) -> None:
    # The live stream is cut when the page closes: not a failure of the page.
    if "/changes/stream" in url and failure in ("net::ERR_ABORTED", None):
        return
    w.failed_requests.append(f"failed: {url} ({failure})")


__all__ = ["TOKEN", "Service", "Watched"]
