"""The dashboard's HTTP side, in-process (no browser): the security headers on the page
and every asset, no inline script or style and no markup made from strings in the
scripts, what the token guards and what it does not, and the ingest series, latency
probe and phase counts behind ``/dashboard/*``."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from importlib import resources
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from consumer.api import dashboard
from consumer.api.dashboard import ASSETS, IngestSeries, Sampler, count_phases
from consumer.core.codec import decode
from consumer.service import Service
from consumer.settings import Settings
from consumer.store.base import Delivery, DeliveryStatus
from consumer.store.memory import MemoryStore
from tests.support import snapshot, webhook_body

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

# The policy, spelled out here rather than imported: the test pins it.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGES = ["/", "/favicon.ico", "/favicon.svg", *(f"/static/{name}" for name in ASSETS)]


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    async def make(**settings: Any) -> Client:
        service = Service(Settings(database_url="memory://", **settings), MemoryStore())
        client: Client = await aiohttp_client(service.app)
        return client

    return make


def _static(name: str) -> str:
    return resources.files("consumer.api").joinpath("static", name).read_text()


@pytest.mark.parametrize("path", PAGES)
async def test_the_page_and_its_assets_are_served_with_a_strict_policy(
    make_client: MakeClient, path: str
) -> None:
    client = await make_client()
    response = await client.get(path)
    assert response.status == 200
    assert response.headers["Content-Security-Policy"] == POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    expected = {
        "": "text/html",
        ".js": "text/javascript",
        ".css": "text/css",
        ".svg": "image/svg+xml",
        ".ico": "image/svg+xml",
    }[re.sub(r"^.*?(\.\w+)?$", r"\1", path)]
    assert response.content_type == expected
    # Revalidated, not refetched.
    again = await client.get(path, headers={"If-None-Match": response.headers["ETag"]})
    assert again.status == 304


async def test_no_other_file_is_served(make_client: MakeClient) -> None:
    client = await make_client()
    for path in ("/static/index.html", "/static/..%2Fdashboard.py", "/static/x.js"):
        response = await client.get(path)
        assert response.status == 404, path
        assert (await response.json())["error"] == "not_found"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.styles = 0
        self.inline_attributes: list[str] = []
        self.references: list[str] = []
        self._in_script = False
        self.script_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.inline_attributes += [k for k in named if k == "style" or k.startswith("on")]
        if tag == "script":
            self.scripts.append(named)
            self._in_script = True
        if tag == "style":
            self.styles += 1
        for key in ("src", "href"):
            value = named.get(key)
            if value and value.startswith("/"):
                self.references.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


def test_the_page_has_no_inline_script_or_style() -> None:
    page = _Page()
    page.feed(_static("index.html"))
    assert page.scripts == [{"type": "module", "src": "/static/app.js"}]
    assert page.script_text.strip() == ""
    assert page.styles == 0
    assert page.inline_attributes == []
    # Everything it refers to is served without credentials.
    assert page.references
    assert set(page.references) <= dashboard.OPEN_PATHS


def test_the_scripts_never_make_markup_from_strings() -> None:
    sinks = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function"
        r"|createContextualFragment|DOMParser|srcdoc|javascript:"
    )
    modules = [name for name in ASSETS if name.endswith(".js")]
    for name in modules:
        text = _static(name)
        assert not sinks.findall(text), name
        # Every module a script imports is one that is served.
        for imported in re.findall(r'from "\./([\w.]+)"', text):
            assert imported in ASSETS, (name, imported)
    # Attributes set from data are never event handlers or style (dom.js sets them).
    assert "setAttribute(key" in _static("dom.js")
    assert re.search(r'key\.startsWith\("on"\)\) node\.addEventListener', _static("dom.js"))


async def test_with_a_token_the_page_is_open_and_the_figures_are_not(
    make_client: MakeClient,
) -> None:
    client = await make_client(api_token="tok-123")
    for path in [*PAGES, "/dashboard/config"]:
        assert (await client.get(path)).status == 200, path
    config = await (await client.get("/dashboard/config")).json()
    assert config["tokenRequired"] is True
    assert "tok-123" not in str(config)
    bearer = {"Authorization": "Bearer tok-123"}
    for path in ("/dashboard/series", "/dashboard/phases", "/static/not-an-asset.js"):
        assert (await client.get(path)).status == 401, path
    assert (await client.get("/dashboard/series", headers=bearer)).status == 200
    assert (await client.get("/dashboard/phases", headers=bearer)).status == 200
    assert (await client.get("/static/not-an-asset.js", headers=bearer)).status == 404


async def test_without_a_token_the_page_does_not_ask_for_one(make_client: MakeClient) -> None:
    client = await make_client()
    config = await (await client.get("/dashboard/config")).json()
    assert config["tokenRequired"] is False
    assert "completed" in config["phases"]
    assert "transcode-file" in config["types"]


# ---------------------------------------------------------------- the series


def test_the_series_keeps_deltas_per_interval_over_the_window() -> None:
    series = IngestSeries(interval_s=10, window_s=60)
    assert series.observe(10_000, 100, 5) is None  # the baseline
    assert series.points(10_000) == []
    point = series.observe(20_000, 150, 7)
    assert point is not None
    assert point.as_dict() == {
        "t": 20_000,
        "seconds": 10.0,
        "eventsPerSecond": 5.0,
        "changesPerSecond": 0.2,
    }
    # A missed tick: the next point spans both intervals, rates stay per second.
    late = series.observe(40_000, 170, 7)
    assert late is not None
    assert late.as_dict()["eventsPerSecond"] == 1.0
    assert late.seconds == 20.0
    # A counter going back (a store replaced behind us) only sets a new baseline.
    assert series.observe(50_000, 10, 7) is None
    assert series.observe(60_000, 20, 8) is not None
    # The last hour only (here: the last 60 s), oldest first.
    for i in range(1, 11):
        series.observe(60_000 + i * 10_000, 20 + i, 8)
    points = series.points(160_000)
    assert [p.t_ms for p in points] == [110_000, 120_000, 130_000, 140_000, 150_000, 160_000]


async def _ingest(store: MemoryStore, task_id: str, phase: str, at: int) -> None:
    body = webhook_body(f"e-{task_id}-{phase}", snapshot(task_id, phase, at))
    await store.ingest([decode(body)], "webhook", at)


async def test_the_sampler_reads_the_store_and_measures_handler_latency() -> None:
    store = MemoryStore()
    await store.open()
    clock = [1000.0]

    async def status() -> dict[str, Any]:
        return {"dispatch": {"handlers": {"h": {}}}}

    sampler = Sampler(store, status, clock=lambda: clock[0])
    await sampler.tick()  # baseline
    await _ingest(store, "t1", "pending", 1)
    await _ingest(store, "t1", "running", 2)
    await _ingest(store, "t2", "pending", 3)
    clock[0] += 10
    await sampler.tick()
    payload = sampler.payload()
    assert payload["intervalSeconds"] == 10
    assert payload["windowSeconds"] == 3600
    [point] = payload["points"]
    assert point["eventsPerSecond"] == 0.3
    assert point["changesPerSecond"] == 0.3
    assert payload["handlers"] == {
        "h": {"samples": 0, "p50Ms": None, "p95Ms": None, "maxMs": None, "windowSeconds": 600}
    }

    # The handler finished two of the three changes, 40 and 90 ms after their commit;
    # the third failed for good: nothing to measure.
    changes = await store.changes_by_seq([1, 2, 3])
    done = [
        Delivery("h", c.seq, DeliveryStatus.DONE, 1, c.recorded_at, c.recorded_at + ms)
        for c, ms in zip(changes[:2], (40, 90), strict=True)
    ]
    dead = Delivery("h", 3, DeliveryStatus.DEAD, 1, 0, changes[2].recorded_at + 5, "boom")
    await store.record_deliveries([*done, dead])
    clock[0] = max(c.recorded_at for c in changes) / 1000 + 10
    await sampler.tick()
    latency = sampler.payload()["handlers"]["h"]
    assert latency == {"samples": 2, "p50Ms": 40, "p95Ms": 90, "maxMs": 90, "windowSeconds": 600}
    await store.close()


async def test_phase_counts_are_exact_up_to_the_cap() -> None:
    store = MemoryStore()
    await store.open()
    for i in range(3):
        await _ingest(store, f"run-{i}", "running", i + 1)
    await _ingest(store, "done", "completed", 10)
    await _ingest(store, "odd", "some-new-phase", 11)
    exact = await count_phases(store)
    assert exact["total"] == 5
    assert exact["phases"]["running"] == 3
    assert exact["phases"]["completed"] == 1
    assert exact["capped"] == []
    assert exact["other"] == 1
    capped = await count_phases(store, cap=2)
    assert capped["phases"]["running"] == 2
    assert capped["capped"] == ["running"]
    assert capped["other"] is None  # unknown while a count is only a floor
    await store.close()
