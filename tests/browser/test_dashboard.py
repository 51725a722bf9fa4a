"""The dashboard in headless Chromium, against a real ``phasewatch serve``: it loads
cleanly, shows a task posted after load without a reload, shows a task's timeline,
re-drives and drops dead letters with its buttons, renders hostile task fields as text,
asks for the API token when one is set, and leaves a screenshot for review."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import HANDLER, TOKEN, Service, Watched
from tests.support import deliveries, wait_until_sync

pytestmark = pytest.mark.slow  # spawns phasewatch and a browser

T0 = 1_790_000_000_000  # status.updatedAt of the tests' tasks (ms)
LIVE_WITHIN_MS = 2000  # the issue: a task posted after load appears within 2 s


def utc(ms: int) -> str:
    """A time as the page writes it."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def js_encode(text: str) -> str:
    """encodeURIComponent."""
    return quote(text, safe="!'()*-._~")


def open_dashboard(page: Page, service: Service) -> None:
    page.goto(f"{service.url}/")
    expect(page.locator("#overview")).to_be_visible()
    # The live stream is open (it starts at the newest change: later ones all arrive).
    expect(page.locator("#live")).to_have_attribute("data-state", "live")


def test_the_page_loads_without_errors(service: Service, watched: Watched) -> None:
    service.post_task("loaded-1", "running", T0)
    page = watched.page
    open_dashboard(page, service)
    expect(page.locator('#phase-counts [data-phase="running"] .count')).to_have_text("1")
    expect(page.locator("#task-rows")).to_contain_text("loaded-1")
    expect(page.locator("#handler-rows")).to_contain_text(HANDLER)
    expect(page.locator("#chart-events svg")).to_have_count(1)
    expect(page.locator("#chart-changes svg")).to_have_count(1)
    expect(page.locator("#lag-rows")).to_contain_text("Kafka is not configured")
    # The icon the browser asks for is served (no 404 in the console).
    expect(page.locator('link[rel="icon"]')).to_have_attribute("href", "/favicon.svg")
    assert watched.problems() == []


def test_a_task_posted_after_load_appears_without_a_reload(
    service: Service, watched: Watched
) -> None:
    page = watched.page
    open_dashboard(page, service)
    expect(page.locator('#phase-counts [data-phase="pending"] .count')).to_have_text("0")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloaded

    service.post_task("arrives-live", "pending", T0)

    expect(page.locator("#change-list")).to_contain_text("arrives-live", timeout=LIVE_WITHIN_MS)
    expect(page.locator("#task-rows")).to_contain_text("arrives-live", timeout=LIVE_WITHIN_MS)
    count = page.locator('#phase-counts [data-phase="pending"] .count')
    expect(count).to_have_text("1", timeout=LIVE_WITHIN_MS)
    assert page.evaluate("window.__sameDocument") is True
    assert watched.problems() == []


def test_the_detail_view_shows_the_timeline(service: Service, watched: Watched) -> None:
    task = "detail-task"
    secret_url = "s3+https://AKIADETAIL:VerySecret123@s3.example/bucket/in.mp4"
    service.post_task(task, "pending", T0, params={"upload": {"url": secret_url}})
    service.post_task(task, "running", T0 + 1000, status_extra={"progress": 0.5})
    service.post_task(task, "completed", T0 + 2000, encryptedKey="enc-key-SECRET-VALUE")
    history = service.get(f"/tasks/{task}/history")

    page = watched.page
    open_dashboard(page, service)
    page.locator("#task-rows a.task-id", has_text=task).click()
    expect(page).to_have_url(re.compile(f"#/task/{task}$"))
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-id")).to_have_text(task)

    items = page.locator("#timeline > li")
    expect(items).to_have_count(3)
    steps = [
        (None, "pending", T0),
        ("pending", "running", T0 + 1000),
        ("running", "completed", T0 + 2000),
    ]
    for i, (previous, phase, at) in enumerate(steps):
        item = items.nth(i)
        event = history["events"][i]
        expect(item.locator(".seq")).to_have_text(f"#{event['seq']}")
        expect(item.locator(".source")).to_have_text("webhook")
        expect(item.locator(".received")).to_have_text(utc(event["receivedAt"]))
        expect(item.locator(".snapshot-time")).to_have_text(utc(at))
        expect(item.locator(".event-id")).to_have_text(event["eventId"])
        expect(item.locator(".phase-change")).to_contain_text(
            f"{previous or 'none'} → {phase} at {utc(at)}"
        )
    expect(page.locator("#detail-task")).to_contain_text('"phase": "completed"')
    expect(page.locator("#detail-task")).to_contain_text('"encryptedKey": "[redacted]"')

    # Credentials never reach the page: the API hid them, the page shows what it got.
    html = page.content()
    for secret in ("VerySecret123", "AKIADETAIL", "enc-key-SECRET-VALUE"):
        assert secret not in html
    expect(page.locator("#detail-task")).to_contain_text("s3.example/bucket/in.mp4")

    page.locator("#detail a", has_text="all tasks").click()
    expect(page.locator("#overview")).to_be_visible()
    assert watched.problems() == []


def _dead_letter(service: Service, task: str) -> int:
    service.post_task(task, "pending", T0)
    dead = wait_until_sync(
        lambda: [d for d in service.get("/dead-letters")["deadLetters"] if d["taskId"] == task],
        f"a dead letter for {task}",
        timeout=15,
    )
    seq: int = dead[0]["seq"]
    return seq


def _dead_seqs(service: Service) -> set[int]:
    return {d["seq"] for d in service.get("/dead-letters")["deadLetters"]}


def _delivered(service: Service) -> int:
    count: int = service.get("/readyz")["dispatch"]["handlers"][HANDLER]["delivered"]
    return count


def test_the_retry_button_redrives_a_dead_letter(service: Service, watched: Watched) -> None:
    seq = _dead_letter(service, "refused-then-allowed")
    page = watched.page
    open_dashboard(page, service)
    row = page.locator(f'#dead-rows tr[data-seq="{seq}"]')
    expect(row).to_contain_text("refused refused-then-allowed (upload): not allowed yet")
    expect(page.locator("#handler-rows td").nth(3)).to_have_text("1")  # dead

    service.allow.touch()  # the handler accepts from now on
    row.locator("button.retry").click()

    expect(page.locator("#notice")).to_have_text("re-driving 1 dead letter(s)")
    expect(row).to_have_count(0)
    # The admin API agrees: no longer dead; and the handler got it this time.
    assert seq not in _dead_seqs(service)
    wait_until_sync(lambda: _delivered(service) == 1, "the re-driven delivery", timeout=15)
    assert seq not in _dead_seqs(service)
    expect(page.locator("#handler-rows td").nth(1)).to_have_text("1", timeout=10_000)
    assert watched.problems() == []


def test_the_drop_button_gives_up_on_a_dead_letter(service: Service, watched: Watched) -> None:
    seq = _dead_letter(service, "refused-and-dropped")
    page = watched.page
    open_dashboard(page, service)
    row = page.locator(f'#dead-rows tr[data-seq="{seq}"]')
    row.locator("button.drop").click()
    expect(page.locator("#notice")).to_have_text("dropped 1 dead letter(s)")
    expect(row).to_have_count(0)
    assert seq not in _dead_seqs(service)  # dropped: no longer listed, never re-driven
    assert watched.problems() == []


# Task fields come from outside: each of these must show as the text it is.
HOSTILE_ID = '<img src=x onerror="window.__pwned=1">'
HOSTILE_TYPE = '"><img src=x onerror=window.__pwned=2>'
HOSTILE_ERROR = "<img src=x onerror=window.__pwned=3><script>window.__pwned=4</script>"
HOSTILE_LIVE_ID = '"><script>window.__pwned=5</script>'
HOSTILE_PHASE = "<svg onload=window.__pwned=6>"


def _no_injected_markup(page: Page) -> None:
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img").count() == 0
    assert page.locator("[onerror], [onload]").count() == 0
    assert page.locator("script").count() == 1  # the page's own module
    assert page.locator("svg:not(.chart-svg)").count() == 0


def test_markup_in_task_fields_is_shown_as_text(service: Service, watched: Watched) -> None:
    service.post_task(
        HOSTILE_ID,
        "failed",
        T0,
        type=HOSTILE_TYPE,
        status_extra={"errorMessage": HOSTILE_ERROR},
    )
    page = watched.page
    open_dashboard(page, service)
    service.post_task(HOSTILE_LIVE_ID, HOSTILE_PHASE, T0 + 1000)  # arrives by the stream

    rows = page.locator("#task-rows")
    expect(rows).to_contain_text(HOSTILE_ID)
    expect(rows).to_contain_text(HOSTILE_TYPE)
    expect(rows).to_contain_text(HOSTILE_ERROR)
    expect(rows).to_contain_text(HOSTILE_PHASE)
    changes = page.locator("#change-list")
    expect(changes).to_contain_text(HOSTILE_LIVE_ID)
    expect(changes).to_contain_text(HOSTILE_PHASE)
    # The handler's error message names the task: dead letters show it as text too.
    expect(page.locator("#dead-rows")).to_contain_text(f"refused {HOSTILE_ID} ({HOSTILE_TYPE})")
    link = page.locator("#task-rows a.task-id", has_text=HOSTILE_ID)
    assert link.get_attribute("href") == f"#/task/{js_encode(HOSTILE_ID)}"
    _no_injected_markup(page)

    link.click()
    expect(page.locator("#detail-id")).to_have_text(HOSTILE_ID)
    expect(page.locator("#timeline > li")).to_have_count(1)
    expect(page.locator("#detail-task")).to_contain_text(HOSTILE_ERROR)
    _no_injected_markup(page)

    page.go_back()  # the overview again (the hash route)
    page.locator("#change-list a.task-id", has_text=HOSTILE_LIVE_ID).click()
    expect(page.locator("#detail-id")).to_have_text(HOSTILE_LIVE_ID)
    expect(page.locator("#timeline")).to_contain_text(HOSTILE_PHASE)
    _no_injected_markup(page)
    # Nothing was even blocked by the CSP (a violation is a console error): no markup
    # was made from the data in the first place.
    assert watched.problems() == []


def test_with_a_token_the_page_asks_for_it(token_service: Service, watched: Watched) -> None:
    service = token_service  # runs with PHASEWATCH_API_TOKEN set
    page = watched.page
    page.goto(f"{service.url}/")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#overview")).to_be_hidden()

    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("That token was refused.")
    expect(page.locator("#overview")).to_be_hidden()

    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#overview")).to_be_visible()
    expect(page.locator("#live")).to_have_attribute("data-state", "live")  # ?token= works
    expect(page.locator("#handler-rows")).to_contain_text(HANDLER)

    service.post_task("with-token", "running", T0)
    expect(page.locator("#change-list")).to_contain_text("with-token", timeout=LIVE_WITHIN_MS)
    expect(page.locator("#task-rows")).to_contain_text("with-token", timeout=LIVE_WITHIN_MS)

    # Kept in this tab's session storage, nowhere in the page.
    assert page.evaluate("sessionStorage.getItem('phasewatch.token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert TOKEN not in page.content()

    page.reload()  # the same tab: no second prompt
    expect(page.locator("#overview")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#task-rows")).to_contain_text("with-token")

    page.click("#signout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('phasewatch.token')") is None
    # The only errors: the refused token's 401 (the browser logs it, and the request).
    assert [p for p in watched.problems() if "401" not in p] == []
    assert any("401" in p and "/tasks?limit=1" in p for p in watched.problems())


def _settled(service: Service) -> bool:
    status = service.get("/readyz")
    handler = status["dispatch"]["handlers"][HANDLER]
    return bool(status["pendingChanges"] == 0 and handler["queued"] == 0 and handler["delivered"])


def test_a_screenshot_for_review(service: Service, watched: Watched, tmp_path: Path) -> None:
    service.allow.touch()  # the fixture stream is delivered
    for d in deliveries("small"):
        assert service.proc.post("/webhooks/livepeer", d.body) == 200
    wait_until_sync(lambda: _settled(service), "the fixture's changes delivered")

    page = watched.page
    open_dashboard(page, service)
    # The first point of the ingest series: the sampler's second tick (every 10 s).
    expect(page.locator("#chart-events .dot, #chart-events .line").first).to_be_attached(
        timeout=35_000
    )
    # A change after the sampler started is measured: commit to the handler's return.
    service.post_task("live-for-the-screenshot", "running", T0 + 10**9)
    expect(page.locator("#change-list")).to_contain_text("live-for-the-screenshot")
    latency = page.locator("#handler-rows td").nth(5)
    # Measured at the first tick after its delivery record (up to two ticks), shown at
    # the page's next refresh (every 5 s).
    expect(latency).to_have_text(re.compile(r"^\d+ ms / \d+ ms / \d+ ms$"), timeout=40_000)
    service.allow.unlink()  # one more change is refused: a dead letter
    service.post_task("refused-for-the-screenshot", "pending", T0 + 10**9 + 1)
    expect(page.locator("#dead-rows")).to_contain_text("refused-for-the-screenshot", timeout=10_000)
    overview = tmp_path / "dashboard.png"
    page.screenshot(path=str(overview), full_page=True)

    completed = page.locator("#task-rows tr", has=page.locator(".phase-completed")).first
    completed.locator("a.task-id").click()
    expect(page.locator("#timeline .phase-change").first).to_be_visible()
    detail = tmp_path / "dashboard-task.png"
    page.screenshot(path=str(detail), full_page=True)

    for path in (overview, detail):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {path}")
    assert watched.problems() == []
