"""GET /metrics: the service's figures in the Prometheus text format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from consumer.core.change import PhaseChange
from consumer.dispatch.subscription import Subscription
from tests.http.conftest import PATH, MakeClient
from tests.support import deliveries, wait_until


async def test_metrics_expose_counts_and_handler_figures(make_client: MakeClient) -> None:
    async def ok(change: PhaseChange) -> None:
        return None

    client, _ = await make_client(handlers=[Subscription(name="ok", fn=ok)], api_token="t")
    stream = deliveries("small")
    for d in stream:
        response = await client.post(PATH, data=d.body, headers={"Livepeer-Signature": d.signature})
        assert response.status == 200
    assert (await client.get("/metrics")).status == 401  # figures are behind the token too
    Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

    async def scrape() -> Samples:
        response = await client.get("/metrics", headers={"Authorization": "Bearer t"})
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def drained() -> Samples | None:
        samples = await scrape()
        return samples if samples[("phasewatch_pending_changes", ())] == 0 else None

    samples = await wait_until(drained, "phasewatch_pending_changes to reach 0")
    distinct = len({d.doc["id"] for d in stream})
    assert samples[("phasewatch_events", ())] == distinct
    assert samples[("phasewatch_webhook_events_accepted_total", ())] == distinct
    assert samples[("phasewatch_webhook_events_duplicate_total", ())] == len(stream) - distinct
    changes = samples[("phasewatch_changes", ())]
    assert samples[("phasewatch_handler_delivered_total", (("handler", "ok"),))] == changes
    assert samples[("phasewatch_dispatch_leader", ())] == 1
