"""What the probes mean: /healthz (liveness: the loop serving answers in time) and
/readyz (readiness: the store takes commits, Kafka consumption runs, the consumer is in
its group)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from consumer.logs import _TransientKafka
from tests.http.conftest import MakeClient
from tests.support import wait_until


class StubSource:
    def __init__(self, **figures: Any) -> None:
        self.figures = {
            "records": 0,
            "poison": 0,
            "commitFailures": 0,
            "lag": {},
            "failed": None,
            "group": "phasewatch",
            "assigned": [],
            "joined": True,
            "joinOverdue": False,
            **figures,
        }

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return self.figures


async def test_a_member_without_partitions_is_ready(make_client: MakeClient) -> None:
    """A group may have more members than partitions: such a replica still serves."""
    client, service = await make_client()
    service.kafka = StubSource(assigned=[], joined=True)  # type: ignore[assignment]
    assert (await client.get("/readyz")).status == 200


async def test_readyz_is_503_while_the_consumer_is_out_of_its_group_too_long(
    make_client: MakeClient,
) -> None:
    client, service = await make_client()
    service.kafka = StubSource(joined=False, joinOverdue=True)  # type: ignore[assignment]
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["error"] == "kafka_not_joined"


async def test_healthz_fails_while_the_loop_runs_late(make_client: MakeClient) -> None:
    client, _ = await make_client(liveness_max_lag_s=0.2)
    assert (await client.get("/healthz")).status == 200
    # Something blocks the loop for longer than the limit (a handler used to do this).
    asyncio.get_running_loop().call_soon(time.sleep, 0.6)
    late = await client.get("/healthz")
    assert late.status == 503 and (await late.json())["error"] == "loop_stuck"

    async def healthy() -> bool:
        return (await client.get("/healthz")).status == 200

    await wait_until(healthy, "/healthz to pass again")


def test_aiokafka_transient_start_up_errors_are_warnings() -> None:
    record = logging.LogRecord(
        "aiokafka.consumer.group_coordinator",
        logging.ERROR,
        __file__,
        1,
        "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError",
        (),
        None,
    )
    assert _TransientKafka().filter(record)
    assert record.levelname == "WARNING"
    other = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, "Fatal error", (), None)
    _TransientKafka().filter(other)
    assert other.levelname == "ERROR"
