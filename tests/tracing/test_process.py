"""A real ``phasewatch serve`` configured by the standard OTEL_* variables alone, exporting
OTLP/HTTP to a tiny collector in this test: the chain arrives, under the service's name,
and the notification carries the trace; a misnamed exporter stops the start."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from consumer.core.signature import sign
from tests.process.service_proc import PHASEWATCH, ServiceProcess
from tests.support import FIXTURE_SECRET, REPO, snapshot, wait_until, webhook_body

pytestmark = pytest.mark.slow

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
INCOMING = f"00-{TRACE_ID}-b7ad6b7169203331-01"
NOTIFY_SECRET = "whsec_" + base64.b64encode(b"process-receiver-secret").decode()


class Collector:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) and a notification
    receiver (``POST /hook``) on one loopback port."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.notifications: list[dict[str, str]] = []  # their headers, lower-cased
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((resource, span) for span in scope_spans.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def _hook(self, request: web.Request) -> web.Response:
        await request.read()
        self.notifications.append({k.lower(): v for k, v in request.headers.items()})
        return web.Response(text="ok")

    def named(self, name: str) -> list[Span]:
        return [span for _, span in self.spans if span.name == name]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in pairs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    server = Collector()
    await server.start()
    yield server
    await server.stop()


async def test_serve_exports_the_chain_over_otlp(tmp_path: Path, collector: Collector) -> None:
    service = ServiceProcess(
        tmp_path / "pw.db",
        {
            # Only the SDK's variables: no PHASEWATCH_* setting turns tracing on.
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_EXPORTER": "",
            "OTEL_SERVICE_NAME": "",
            "OTEL_SDK_DISABLED": "",
            "PHASEWATCH_WEBHOOK_SECRET": FIXTURE_SECRET.decode(),
            "PHASEWATCH_WEBHOOK_TOLERANCE_S": "0",
            "PHASEWATCH_NOTIFY_URL": f"http://127.0.0.1:{collector.port}/hook",
            "PHASEWATCH_NOTIFY_SECRET": NOTIFY_SECRET,
            "PHASEWATCH_SQLITE_WRITER": "process",
        },
    )
    await asyncio.to_thread(service.start)
    try:
        body = webhook_body("ev-p", snapshot("task-p", "completed", 9))
        headers = {
            "Livepeer-Signature": sign(FIXTURE_SECRET, body, int(time.time() * 1000)),
            "traceparent": INCOMING,
        }
        async with aiohttp.ClientSession() as session:
            url = f"{service.url}/webhooks/livepeer"
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 200
        await wait_until(
            lambda: collector.named("handler.deliver") and collector.notifications,
            "the delivery's span and the notification",
        )
    finally:
        assert await asyncio.to_thread(service.stop) == 0

    (receive,) = collector.named("webhook.receive")
    (delivery,) = collector.named("handler.deliver")
    commits = collector.named("store.commit")
    assert receive.trace_id.hex() == TRACE_ID
    assert receive.parent_span_id.hex() == "b7ad6b7169203331"
    assert receive.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert (delivery.trace_id, delivery.parent_span_id) == (receive.trace_id, receive.span_id)
    assert _attributes(delivery.attributes)["phasewatch.handler"] == "http-notify"
    assert any(
        (link.trace_id, link.span_id) == (receive.trace_id, receive.span_id)
        for commit in commits
        for link in commit.links
    )
    (notification,) = collector.notifications
    assert notification["traceparent"] == f"00-{TRACE_ID}-{delivery.span_id.hex()}-01"
    resources = {resource["service.name"] for resource, _ in collector.spans}
    assert resources == {"phasewatch"}  # the SDK's "unknown_service" replaced
    log = service.log.read_text()
    assert "tracing on" in log
    assert NOTIFY_SECRET not in log


def test_a_misnamed_exporter_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    env = ServiceProcess(tmp_path / "pw.db", {"OTEL_TRACES_EXPORTER": "jaegre"}).env
    done = subprocess.run(
        [PHASEWATCH, "serve"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "phasewatch: OTEL_TRACES_EXPORTER: no trace exporter 'jaegre' is installed"
    )
    assert "Traceback" not in done.stderr
