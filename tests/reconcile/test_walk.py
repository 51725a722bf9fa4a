"""One reconcile pass against the Studio stand-in: tasks whose webhooks were lost are
folded and their changes reach the handlers; the walk survives §7's quirks (the page
cap, newest first by default, the OFFSET cursor's skips, plateaus of one updatedAt);
429 and 5xx are retried, 401 is a clear error; the watermark is kept in the store."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import orjson
import pytest

from consumer.core.change import PhaseChange
from consumer.core.times import now_ms
from consumer.dispatch.dispatcher import Dispatcher
from consumer.dispatch.subscription import Subscription
from consumer.replay.job import Job
from consumer.sources.reconcile import WATERMARK_KEY, load_watermark, reconcile_pass
from consumer.sources.studio import (
    MAX_LIMIT,
    AuthError,
    BadResponse,
    NetworkError,
    ServerError,
    StudioClient,
    retry_after,
)
from consumer.store.base import Store
from consumer.store.memory import MemoryStore
from consumer.store.sqlite.store import SQLiteStore
from tests.reconcile.conftest import MakeClient
from tests.reconcile.studio_standin import StudioStandin, task
from tests.support import wait_until, webhook_body

B = 1_750_000_000_000  # a base time, Unix ms


async def deliver(store: Store, *tasks: dict[str, object]) -> None:
    """What the webhooks did bring."""
    bodies = [webhook_body(f"wh-{t['id']}-{i}", t) for i, t in enumerate(tasks)]
    result = await store.ingest_raw(bodies, "webhook", now_ms())
    assert not result.rejected


class Heard:
    """A recording handler (handlers run on a loop and thread of their own)."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str | None, str]] = []
        self._lock = threading.Lock()

    def subscription(self) -> Subscription:
        async def handler(change: PhaseChange) -> None:
            with self._lock:
                self.changes.append((change.task_id, change.previous_phase, change.phase))

        return Subscription(name="heard", fn=handler)

    def got(self) -> set[tuple[str, str | None, str]]:
        with self._lock:
            return set(self.changes)


async def test_a_pass_repairs_what_the_webhooks_missed_and_the_handlers_hear_it(
    store: Store, studio: StudioStandin, make_client: MakeClient
) -> None:
    fillers = [task(f"F{i:02}", "completed", B + 60 + i) for i in range(12)]
    # The webhooks brought A and B running, C completed and the fillers; D never came.
    await deliver(
        store,
        task("A", "running", B + 10),
        task("B", "running", B + 20),
        task("C", "completed", B + 30),
        *fillers,
    )
    # Studio knows better: A completed (its webhooks were lost), D failed.
    studio.put(
        task("A", "completed", B + 100, outputAssetId="out-A"),
        task("B", "running", B + 20),
        task("C", "completed", B + 30),
        task("D", "failed", B + 50),
        *fillers,
    )
    heard = Heard()
    dispatcher = Dispatcher(store, [heard.subscription()], lanes=2, poll_s=0.5)
    await dispatcher.start()  # after the webhooks: it hears only what reconcile finds
    try:
        before = (await store.stats()).last_change_seq
        report = await reconcile_pass(store, make_client(), on_changes=dispatcher.notify)

        assert (report.seen, report.repaired, report.rejected) == (16, 2, 0)
        assert report.pages == 3  # a page cap of 7: 7 + 7 + the overlap and the last two
        assert report.start == B + 10  # a first pass starts at the oldest task watched
        assert report.watermark == B + 100
        completed = await store.get_task("A")
        assert completed is not None and completed.phase == "completed"
        assert completed.task["outputAssetId"] == "out-A"
        assert [e.source for e in await store.task_history("A")] == ["webhook", "reconcile"]
        recorded = {
            (c.task_id, c.previous_phase, c.phase) for c in await store.changes_after(before)
        }
        assert recorded == {("A", "running", "completed"), ("D", None, "failed")}
        await wait_until(lambda: heard.got() == recorded, "the handler to hear both repairs")

        again = await reconcile_pass(store, make_client(), on_changes=dispatcher.notify)
        assert (again.repaired, again.new) == (0, 0)
        assert again.start == B + 100 - 60_000  # the watermark, less the overlap
        assert (await store.stats()).last_change_seq == before + 2
    finally:
        await dispatcher.stop()


async def test_the_watermark_persists_across_a_new_store_open(
    tmp_path: Path, studio: StudioStandin, make_client: MakeClient
) -> None:
    studio.put(*(task(f"T{i:02}", "completed", B + i * 1000) for i in range(10)))
    first = SQLiteStore(tmp_path / "pw.db")
    await first.open()
    report = await reconcile_pass(first, make_client(), since=B, overlap_ms=2_000)
    assert (report.seen, report.repaired) == (10, 10)
    assert await first.get_meta(WATERMARK_KEY) == str(B + 9000)
    await first.close()

    studio.put(task("T09", "failed", B + 20_000), task("N", "completed", B + 21_000))
    studio.requests.clear()
    second = SQLiteStore(tmp_path / "pw.db")
    await second.open()
    try:
        assert await load_watermark(second) == B + 9000
        report = await reconcile_pass(second, make_client(), overlap_ms=2_000)
        asked = orjson.loads(studio.requests[0]["filters"])
        assert asked == [{"id": "updatedAt", "value": {"gte": B + 7000}}]
        # T07, T08 again (the overlap: duplicates), then the two updates.
        assert (report.seen, report.new, report.repaired) == (4, 2, 2)
        assert await load_watermark(second) == B + 21_000
    finally:
        await second.close()


async def test_the_stand_in_cursor_skips_rows_updated_while_paging(
    studio: StudioStandin, make_client: MakeClient
) -> None:
    """The quirk itself: following Studio's `next` cursor, a walk loses rows."""
    studio.max_limit = 10
    studio.put(*(task(f"T{i:02}", "running", B + i) for i in range(30)))
    studio.before_page = lambda n: _complete(studio, n, "T03", "T05")
    client = make_client()
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await client.list_tasks(updated_since=B, cursor=cursor)
        seen += [t["id"] for t in page.tasks]
        if not page.more or not page.tasks:
            break
        cursor = page.cursor
    missed = {f"T{i:02}" for i in range(30)} - set(seen)
    assert missed == {"T10", "T11"}  # shifted up by the two that moved to the end


async def test_the_walk_misses_no_task_updated_while_it_pages(
    studio: StudioStandin, make_client: MakeClient
) -> None:
    studio.max_limit = 10
    studio.put(*(task(f"T{i:02}", "running", B + i) for i in range(30)))
    studio.before_page = lambda n: _complete(studio, n, "T03", "T05")
    store = MemoryStore()
    await store.open()
    report = await reconcile_pass(store, make_client(), since=B)
    assert (await store.stats()).tasks == 30
    for task_id in ("T03", "T05"):
        done = await store.get_task(task_id)
        assert done is not None and done.phase == "completed"
    # Every task once, and the two updated ones once more in their new state.
    assert report.seen == 32
    assert report.watermark == B + 1001
    # Nothing was asked with a cursor: each page starts at the highest updatedAt seen.
    assert all("cursor" not in r for r in studio.requests)
    ranges = [orjson.loads(r["filters"])[0]["value"]["gte"] for r in studio.requests]
    assert ranges == sorted(ranges) and ranges[0] == B


def _complete(studio: StudioStandin, request: int, *task_ids: str) -> None:
    """Before the second page: these tasks complete (they move to the end of the order)."""
    if request == 2:
        for i, task_id in enumerate(task_ids):
            studio.put(task(task_id, "completed", B + 1000 + i))


async def test_a_plateau_of_one_updated_at_is_walked_with_the_cursor(
    studio: StudioStandin, make_client: MakeClient
) -> None:
    # Wider than a page, all at one millisecond; and Link points somewhere else (the key
    # must only ever go to the configured URL: an unroutable address would hang).
    studio.link_base = "http://192.0.2.1:9/api"
    studio.put(*(task(f"P{i:02}", "completed", B) for i in range(25)))
    studio.put(task("Z", "completed", B + 1))
    store = MemoryStore()
    await store.open()
    report = await reconcile_pass(store, make_client(), since=B)
    assert (await store.stats()).tasks == 26
    assert report.seen == 26 and report.repaired == 26
    assert any("cursor" in r for r in studio.requests)


async def test_requests_ask_ascending_ranges_never_equality(
    studio: StudioStandin, make_client: MakeClient
) -> None:
    studio.put(*(task(f"T{i:02}", "completed", B + i) for i in range(20)))
    store = MemoryStore()
    await store.open()
    await reconcile_pass(store, make_client(), since=B)
    assert len(studio.requests) >= 3  # the cap of 7 made several pages
    for query in studio.requests:
        assert query["limit"] == str(MAX_LIMIT)
        assert query["order"].startswith("updatedAt-false")
        for flt in orjson.loads(query["filters"]):
            assert isinstance(flt["value"], dict) and set(flt["value"]) <= {"gt", "gte"}


async def test_a_server_that_ignores_the_order_stops_the_pass_rather_than_skip(
    studio: StudioStandin, make_client: MakeClient
) -> None:
    studio.honour_order = False  # newest first, whatever was asked
    studio.put(*(task(f"T{i:02}", "completed", B + i) for i in range(10)))
    store = MemoryStore()
    await store.open()
    with pytest.raises(BadResponse, match="ascending updatedAt"):
        await reconcile_pass(store, make_client(), since=B)
    assert await load_watermark(store) is None


async def test_429_and_5xx_are_retried_and_the_pass_completes(
    studio: StudioStandin, make_client: MakeClient, waits: list[float]
) -> None:
    studio.put(*(task(f"T{i:02}", "completed", B + i) for i in range(10)))
    studio.fail(429, retry_after="7")
    studio.fail(503)
    studio.fail(500)
    client = make_client()
    store = MemoryStore()
    await store.open()
    report = await reconcile_pass(store, client, since=B)
    assert report.seen == 10
    assert (await store.stats()).tasks == 10
    assert waits[0] == 7.0  # Retry-After, as said
    assert 0 <= waits[1] <= 1.0 and 0 <= waits[2] <= 2.0  # then backoff from 0.5 s
    assert dict(client.stats.errors) == {"rate_limited": 1, "server": 2}
    assert report.requests == len(studio.requests) == studio.served + 3


async def test_retries_give_up_with_a_server_error(
    studio: StudioStandin, make_client: MakeClient
) -> None:
    studio.put(task("T", "completed", B))
    studio.fail(502, times=5)
    store = MemoryStore()
    await store.open()
    with pytest.raises(ServerError, match="HTTP 502"):
        await reconcile_pass(store, make_client(attempts=3), since=B)
    assert len(studio.requests) == 3


async def test_401_is_one_clear_line_naming_the_setting(
    studio: StudioStandin, make_client: MakeClient
) -> None:
    secret = "sk_live_not_the_one"
    client = make_client(api_key=secret)
    store = MemoryStore()
    await store.open()
    with pytest.raises(AuthError) as caught:
        await reconcile_pass(store, client, since=B)
    message = str(caught.value)
    assert "PHASEWATCH_LIVEPEER_API_KEY" in message and "401" in message
    assert secret not in message and "\n" not in message
    assert len(studio.requests) == 1  # never retried
    assert dict(client.stats.errors) == {"auth": 1}


async def test_no_answer_is_a_network_error_after_the_retries(waits: list[float]) -> None:
    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    # A port nothing listens on: connection refused.
    async with StudioClient("http://127.0.0.1:9/api", "k", attempts=2, sleep=sleep) as client:
        store = MemoryStore()
        await store.open()
        with pytest.raises(NetworkError, match=r"no answer from http://127\.0\.0\.1:9/api/task"):
            await reconcile_pass(store, client, since=B)
    assert dict(client.stats.errors) == {"network": 2} and len(waits) == 1


async def test_a_stop_ends_the_pass_after_its_page_with_the_watermark_saved(
    studio: StudioStandin, make_client: MakeClient
) -> None:
    studio.put(*(task(f"T{i:02}", "completed", B + i) for i in range(20)))
    store = MemoryStore()
    await store.open()

    def stop_after_first(batches: int) -> None:
        raise KeyboardInterrupt

    report = await reconcile_pass(store, make_client(), since=B, job=Job(on_batch=stop_after_first))
    assert report.interrupted and report.pages == 1
    assert await load_watermark(store) == B + 6
    rest = await reconcile_pass(store, make_client(), overlap_ms=0)
    assert rest.start == B + 6 and (await store.stats()).tasks == 20


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("120") == 120.0
    when = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert retry_after(format_datetime(when, usegmt=True), now=when.timestamp() - 30) == 30.0
    assert retry_after("soon") is None
    assert retry_after(None) is None
