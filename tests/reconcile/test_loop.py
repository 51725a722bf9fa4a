"""The reconcile loop in ``serve``: two services on one store (one SQLite file, or one
PostgreSQL database) stand for two replicas; one of them, the lease holder, runs the
passes, and the other takes over when it stops. A completion whose webhook was lost
reaches the handler; /metrics shows the loop's figures; a refused key is logged and the
loop goes on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from consumer.core.times import now_ms
from consumer.service import Service
from consumer.settings import Settings
from consumer.sources.reconcile import ReconcileLoop
from consumer.sources.studio import StudioClient
from consumer.store.base import Store
from consumer.store.memory import MemoryStore
from consumer.store.postgres.store import PostgresStore
from consumer.store.sqlite.store import SQLiteStore
from tests.reconcile.studio_standin import StudioStandin, task
from tests.reconcile.test_walk import Heard, deliver
from tests.support import wait_until

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Opens one store after another on the same database."""
    if request.param == "postgres":
        server = request.getfixturevalue("pg_server")
        server.ensure_running()
        url = await server.create_database()

        def make() -> Store:
            return PostgresStore(url)
    else:

        def make() -> Store:
            return SQLiteStore(tmp_path / "shared.db", synchronous="NORMAL")

    return make


def settings_for(studio: StudioStandin, **extra: Any) -> Settings:
    return Settings(
        livepeer_api_key=studio.api_key,
        livepeer_api_url=studio.url,
        reconcile_interval_s=0.05,
        reconcile_overlap_s=0,
        dispatch_lease_s=3,
        **extra,
    )


async def test_one_replica_at_a_time_reconciles_and_the_handler_hears(
    shared: StoreFactory, studio: StudioStandin, aiohttp_client: Any
) -> None:
    t0 = now_ms() - 60_000
    seed = shared()
    await seed.open()
    await deliver(seed, task("X", "running", t0))  # its completion's webhook never came
    await seed.close()
    studio.put(task("X", "completed", t0 + 5_000), task("Y", "running", t0 + 6_000))

    heard = Heard()
    services = [Service(settings_for(studio), shared(), [heard.subscription()]) for _ in "ab"]
    clients: list[TestClient[Any, Any]] = []
    for service in services:
        clients.append(await aiohttp_client(service.app))
    loops: list[ReconcileLoop] = []
    for service in services:
        assert service.reconcile is not None
        loops.append(service.reconcile)

    await wait_until(
        lambda: {("X", "running", "completed"), ("Y", None, "running")} <= heard.got(),
        "the handler to hear the repaired tasks",
    )

    def busy() -> list[int]:
        return [i for i, loop in enumerate(loops) if loop.stats.passes >= 3]

    lead = (await wait_until(busy, "three passes on one replica"))[0]
    other = loops[1 - lead]
    # While the holder renews its lease, the other replica never ran a pass.
    assert loops[lead].stats.leader and not other.stats.leader and other.stats.passes == 0

    samples = await scrape(clients[lead])
    assert samples[("phasewatch_reconcile_leader", ())] == 1
    assert samples[("phasewatch_reconcile_tasks_repaired_total", ())] == 2
    assert samples[("phasewatch_reconcile_passes_total", ())] >= 3
    assert samples[("phasewatch_reconcile_requests_total", ())] >= 3
    assert samples[("phasewatch_reconcile_errors_total", (("kind", "auth"),))] == 0
    assert samples[("phasewatch_reconcile_last_success_timestamp_seconds", ())] > t0 / 1000
    assert (await scrape(clients[1 - lead]))[("phasewatch_reconcile_leader", ())] == 0

    await clients[lead].close()  # a graceful stop gives the lease up
    await wait_until(lambda: other.stats.leader and other.stats.passes >= 1, "the takeover")
    await clients[1 - lead].close()


async def scrape(client: TestClient[Any, Any]) -> dict[tuple[str, tuple[Any, ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await response.text())
        for s in family.samples
    }


async def test_a_refused_key_is_logged_in_one_line_and_the_loop_goes_on(
    studio: StudioStandin, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk_refused_0123456789"
    store = MemoryStore()
    await store.open()
    loop = ReconcileLoop(store, lambda: StudioClient(studio.url, key), interval_s=0.05, lease_s=3)
    with caplog.at_level(logging.INFO, logger="consumer.sources.reconcile"):
        await loop.start()
        try:
            await wait_until(lambda: loop.stats.failed_passes >= 2, "two failed passes")
        finally:
            await loop.stop()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) >= 2
    assert all("PHASEWATCH_LIVEPEER_API_KEY" in r.getMessage() for r in errors)
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in errors)
    assert not any(key in r.getMessage() for r in caplog.records)
    assert loop.status()["errors"] == {"auth": loop.stats.failed_passes}
    assert loop.stats.last_success_ms is None


def test_settings_default_the_interval_to_300_s_with_a_key() -> None:
    assert Settings().reconcile_every_s() == 0
    assert Settings(livepeer_api_key="k").reconcile_every_s() == 300
    assert Settings(livepeer_api_key="k", reconcile_interval_s=0).reconcile_every_s() == 0
    with pytest.raises(ValueError, match="PHASEWATCH_LIVEPEER_API_KEY"):
        Settings(reconcile_interval_s=60)
    with pytest.raises(ValueError, match="http"):
        Settings(livepeer_api_url="ftp://studio")
