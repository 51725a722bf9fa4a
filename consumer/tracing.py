"""Optional OpenTelemetry tracing: a webhook, the commit that made it durable, and each
delivery of the change it caused, in one trace.

Tracing is on only when both hold when ``serve`` starts (it calls :func:`configure`
once, before anything else is built):

* the ``otel`` extra is installed (``pip install 'phasewatch[otel]'``: opentelemetry-api,
  opentelemetry-sdk and the OTLP/HTTP exporter);
* the standard ``OTEL_*`` variables ask for traces: ``OTEL_TRACES_EXPORTER`` names an
  exporter other than ``none``, or an OTLP endpoint is set
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``).
  ``OTEL_SDK_DISABLED=true`` keeps it off whatever else is set; ``OTEL_SERVICE_NAME``
  alone does not turn it on (it names the service, often for other signals too).

Otherwise nothing of OpenTelemetry is imported: each function here checks one module
global and does what phasewatch does without tracing (a receipt keeps the request's own
valid ``traceparent``, a notification sends the change's stored one). Variables asking
for traces without the extra installed get one warning at start, and no spans.

The ``OTEL_*`` variables are the SDK's own, read by the SDK (the exporter, the resource,
the sampler, the batch processor), not by :mod:`consumer.settings`, which reads only
``PHASEWATCH_*`` (and does not warn about ``OTEL_*``). The ones that matter:

* ``OTEL_TRACES_EXPORTER``: comma-separated; ``otlp`` (the default when only an endpoint
  is set) is OTLP over HTTP/protobuf, the extra's exporter (``OTEL_EXPORTER_OTLP_PROTOCOL``
  or ``_TRACES_PROTOCOL`` = ``grpc`` needs opentelemetry-exporter-otlp-proto-grpc
  installed too); ``console`` prints each span on stdout; any other name is looked up
  among installed exporters (entry points ``opentelemetry_traces_exporter``), as the SDK
  does; an unknown name stops the start (``phasewatch: OTEL_TRACES_EXPORTER: ...``, exit 2).
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``/v1/traces`` is appended) or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is), and their ``_HEADERS`` (an API
  key goes there: read by the SDK, never logged here), ``_TIMEOUT``, ``_COMPRESSION``,
  ``_CERTIFICATE``.
* ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (the service is ``phasewatch``
  unless they name it; ``service.version`` is phasewatch's).
* ``OTEL_TRACES_SAMPLER`` / ``_ARG``: default ``parentbased_always_on``, so a sender's
  sampled flag is followed down to the deliveries.
* ``OTEL_BSP_*`` (export delay and queue), ``OTEL_SPAN_LINK_COUNT_LIMIT`` (128 by
  default: a commit carrying more requests keeps links to the first 128).
* ``OTEL_PROPAGATORS`` is not read: the webhook continues a W3C ``traceparent`` (and
  ``tracestate``), the trace context the history keeps.

A tracer provider already installed globally (``opentelemetry-instrument``) is used as
it is: neither replaced nor shut down here.

The spans:

``webhook.receive`` (server) for each ``POST /webhooks/livepeer``: a child of the
request's ``traceparent`` when it carries exactly one valid one (continued with the W3C
propagator), else a root. Attributes: ``http.request.method``, ``http.route``,
``http.response.status_code``, ``phasewatch.outcome`` (``accepted``, ``duplicate``, or
the error code of the answer), and once the signature is verified
``phasewatch.event.id``, ``phasewatch.event.type``, ``phasewatch.task.id`` and
``phasewatch.webhook.verified_by`` (the name of the secret, never the secret). Never a
header, a signature or the body. Its context is what the receipt keeps as the event's
``traceparent``, so each change's stored ``traceparent`` (:attr:`PhaseChange.traceparent
<consumer.core.change.PhaseChange.traceparent>`) points at it.

``store.commit`` for each group-commit batch: a root span with one *link* per request
it carries (one commit serves many requests and can have one parent only). A batch that
fails is retried message by message, each retry a ``store.commit`` child of the failed
one. Attributes: ``phasewatch.source``, ``phasewatch.batch.size``, ``.accepted``,
``.duplicates``, ``.rejected``, ``phasewatch.changes``, ``phasewatch.outcome``
(``committed``, ``failed``).

``handler.deliver`` for each attempt to deliver a change to a handler: a *child* of the
change's stored ``traceparent`` (the ``webhook.receive`` that caused it; a root for a
change from Kafka or an untraced source), since one event causes each delivery: the
trace then reads webhook -> deliveries, retries included, with the commit linked.
Attributes: ``phasewatch.handler``, ``phasewatch.task.id``, ``phasewatch.event.id``,
``phasewatch.change.seq``, ``phasewatch.change.kind``, ``phasewatch.change.phase``,
``phasewatch.delivery.attempt``, ``phasewatch.outcome`` (``ok``, ``error``,
``permanent_error``, ``timeout``, ``cancelled``) and ``error.type`` (the exception's
class, never its message). The handler is given the change with its ``traceparent``
set to this span's context (the trace context to continue: the built-in notifier sends
it as a ``traceparent`` header, the Kafka publisher as a record header), and the span
is current on the handler's own loop while it runs, so OpenTelemetry-instrumented code
in a handler nests under it too. While tracing is off, a handler gets the change's
stored ``traceparent``, the request's own, as before.

Only the ``traceparent`` is kept with an event, so a ``tracestate`` the sender gave
continues into ``webhook.receive`` and stops there.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, Tracer

    from consumer.core.change import PhaseChange
    from consumer.core.plan import Outcome
    from consumer.core.receipt import Receipt
    from consumer.store.base import Rejected

__all__ = [
    "configure",
    "enabled",
    "install",
    "requested_by",
    "shutdown",
    "uninstall",
]

log = logging.getLogger(__name__)

_TRACER_NAME = "phasewatch"
_DEFAULT_SERVICE = "phasewatch"
# An identifier taken from a body is cut to this length in an attribute.
_MAX_ID = 256


@dataclass(slots=True)
class _State:
    tracer: Tracer
    provider: TracerProvider | None  # ours to shut down; None when someone else's
    propagator: TextMapPropagator
    kinds: type[SpanKind]
    error: Callable[[str], Status]  # an ERROR status with this description
    parent_of: Callable[[str], Context | None]
    link: Callable[[str], Link]
    attach: Callable[[Context], Token[Context]]
    detach: Callable[[Token[Context]], None]
    in_context: Callable[[Span], Context]


_state: _State | None = None


def enabled() -> bool:
    """Whether spans are being made (:func:`configure` or :func:`install` ran)."""
    return _state is not None


# ------------------------------------------------------------------ configuration


def requested_by(environ: Mapping[str, str] | None = None) -> str | None:
    """The ``OTEL_*`` variable that asks for traces, or None (tracing stays off)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if exporters:
        names = [n.strip() for n in exporters.split(",") if n.strip().lower() != "none"]
        return "OTEL_TRACES_EXPORTER" if any(names) else None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if env.get(name, "").strip():
            return name
    return None


def configure() -> bool:
    """Turn tracing on when the ``OTEL_*`` variables ask for it and the ``otel`` extra
    is installed: a tracer provider from the environment (resource, sampler, span
    limits, batch export to each exporter named), installed as the global one. Called
    once by ``serve`` at start; True when spans are made. Raises
    :class:`~consumer.settings.ConfigError` for an exporter that cannot be had."""
    asked = requested_by()
    if asked is None or _state is not None:
        return _state is not None
    try:
        from opentelemetry import trace  # noqa: PLC0415 - optional, and only when asked
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    except ImportError:
        log.warning(
            "%s asks for traces, but the otel extra is not installed"
            " (pip install 'phasewatch[otel]'): tracing is off",
            asked,
        )
        return False
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        # Someone configured OpenTelemetry before us (opentelemetry-instrument): theirs.
        _set_state(current, owned=None)
        log.info("tracing on, with the tracer provider already installed")
        return True
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    exporters = _exporters()
    provider = TracerProvider(resource=_resource())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _set_state(provider, owned=provider)
    service = provider.resource.attributes.get("service.name")
    log.info(
        "tracing on: spans of service %s to %s",
        service,
        ", ".join(type(e).__name__ for e in exporters),
    )
    return True


def install(provider: Any) -> None:
    """Make spans with ``provider`` (a tracer provider), without touching the global
    one or the environment: for tests, and for an application embedding phasewatch
    that configures OpenTelemetry itself. Not shut down by :func:`shutdown`."""
    _set_state(provider, owned=None)


def uninstall() -> None:
    """Stop making spans (what :func:`install` or :func:`configure` started), without
    shutting anything down."""
    global _state  # noqa: PLW0603 - the one switch every call site checks
    _state = None


def shutdown() -> None:
    """Export what is pending and stop the provider :func:`configure` made (blocking:
    called once the service has stopped, off its loop); then tracing is off."""
    global _state
    state, _state = _state, None
    if state is not None and state.provider is not None:
        state.provider.shutdown()


def _set_state(provider: Any, *, owned: TracerProvider | None) -> None:
    global _state  # noqa: PLW0603
    from opentelemetry import context, trace  # noqa: PLC0415
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    from consumer import __version__  # noqa: PLC0415

    def remote(traceparent: str) -> SpanContext:
        # Only ever given traceparents valid_traceparent() accepted (stored normalised to
        # version 00): the fields are where the format puts them.
        return trace.SpanContext(
            trace_id=int(traceparent[3:35], 16),
            span_id=int(traceparent[36:52], 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(traceparent[53:55], 16)),
        )

    def parent_of(traceparent: str) -> Context | None:
        span_context = remote(traceparent)
        if not span_context.is_valid:
            return None
        return trace.set_span_in_context(trace.NonRecordingSpan(span_context))

    _state = _State(
        tracer=provider.get_tracer(_TRACER_NAME, __version__),
        provider=owned,
        propagator=TraceContextTextMapPropagator(),
        kinds=trace.SpanKind,
        error=lambda description: trace.Status(trace.StatusCode.ERROR, description),
        parent_of=parent_of,
        link=lambda traceparent: trace.Link(remote(traceparent)),
        attach=context.attach,
        detach=context.detach,
        in_context=trace.set_span_in_context,
    )


def _resource() -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415

    from consumer import __version__  # noqa: PLC0415

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create.
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: _DEFAULT_SERVICE}))
    return resource


def _exporters() -> list[SpanExporter]:
    """An exporter for each name in ``OTEL_TRACES_EXPORTER`` (``otlp`` when only an
    endpoint is set), looked up like the SDK does, except that ``otlp`` means the
    OTLP/HTTP exporter the extra installs unless the protocol variables say grpc."""
    from importlib.metadata import entry_points  # noqa: PLC0415

    from consumer.core.secrets import describe_error  # noqa: PLC0415
    from consumer.settings import ConfigError  # noqa: PLC0415

    named = os.environ.get("OTEL_TRACES_EXPORTER", "").strip() or "otlp"
    exporters: list[SpanExporter] = []
    for raw in named.split(","):
        name = raw.strip()
        if not name or name.lower() == "none":
            continue
        entry, variable = _otlp_entry() if name == "otlp" else (name, "OTEL_TRACES_EXPORTER")
        found = list(entry_points(group="opentelemetry_traces_exporter", name=entry))
        if not found and entry == "otlp_proto_grpc":
            raise ConfigError(
                f"{variable}: OTLP over gRPC needs opentelemetry-exporter-otlp-proto-grpc"
                " installed (the otel extra brings OTLP over HTTP: http/protobuf)"
            )
        if not found:
            raise ConfigError(f"{variable}: no trace exporter {name!r} is installed")
        try:
            exporters.append(found[0].load()())
        except Exception as exc:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: the {name!r} exporter cannot start: {describe_error(exc)}"
            ) from None
    return exporters


def _otlp_entry() -> tuple[str, str]:
    """The exporter ``otlp`` stands for, and the variable that chose it."""
    from consumer.settings import ConfigError  # noqa: PLC0415

    for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = os.environ.get(variable, "").strip()
        if not protocol:
            continue
        if protocol == "http/protobuf":
            return "otlp_proto_http", variable
        if protocol == "grpc":
            return "otlp_proto_grpc", variable
        raise ConfigError(f"{variable}: {protocol!r} is not http/protobuf or grpc")
    return "otlp_proto_http", "OTEL_TRACES_EXPORTER"


# ------------------------------------------------------------------ spans


def _traceparent(span: Span) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class _Span:
    """A span made here, as a context manager; the base class is the no-op one, what
    every call gets while tracing is off."""

    __slots__ = ()

    def __enter__(self) -> _Span:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class ReceiveSpan(_Span):
    """``webhook.receive``; see the module's description."""

    __slots__ = ("_scope", "_span", "_state")

    def __init__(self, state: _State, traceparent: str | None, tracestate: str | None) -> None:
        carrier = {"traceparent": traceparent} if traceparent else {}
        if traceparent and tracestate:
            carrier["tracestate"] = tracestate
        parent = state.propagator.extract(carrier) if traceparent else None
        self._state = state
        self._scope = state.tracer.start_as_current_span(
            "webhook.receive",
            context=parent,
            kind=state.kinds.SERVER,
            attributes={"http.request.method": "POST", "http.route": "/webhooks/livepeer"},
            record_exception=False,
            set_status_on_exception=False,
        )
        self._span: Span | None = None

    def __enter__(self) -> ReceiveSpan:
        self._span = self._scope.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None and self._span is not None:
            self._span.set_attribute("error.type", kind.__qualname__)
            self._span.set_status(self._state.error(kind.__qualname__))
        self._scope.__exit__(kind, exc, tb)

    def traceparent(self) -> str | None:
        """This span's context as a W3C ``traceparent``: what the receipt keeps."""
        return None if self._span is None else _traceparent(self._span)

    def verified(self, body: bytes, verified_by: str | None) -> None:
        """The event's identity, once its signature is verified: ids and type taken from
        the body (parsed again only when the span is recorded), nothing else of it."""
        span = self._span
        if span is None or not span.is_recording():
            return
        attributes = _identity(body)
        if verified_by is not None:
            attributes["phasewatch.webhook.verified_by"] = verified_by
        span.set_attributes(attributes)

    def answered(self, status: int, outcome: str) -> None:
        span = self._span
        if span is None:
            return
        span.set_attributes({"http.response.status_code": status, "phasewatch.outcome": outcome})
        if status >= 500:
            span.set_status(self._state.error(outcome))


def receiving(traceparent: str | None, tracestate: str | None) -> ReceiveSpan | None:
    """A ``webhook.receive`` span continuing ``traceparent`` (a valid W3C one or None),
    or None while tracing is off."""
    state = _state
    return None if state is None else ReceiveSpan(state, traceparent, tracestate)


def _identity(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(doc, dict):
        return {}
    found: dict[str, Any] = {}
    _put(found, "phasewatch.event.id", doc.get("id"))
    _put(found, "phasewatch.event.type", doc.get("event"))
    payload = doc.get("payload")
    task = payload.get("task") if isinstance(payload, dict) else None
    if isinstance(task, dict):
        task_id = task.get("id")
        snapshot = task.get("snapshot")
        if not isinstance(task_id, str) and isinstance(snapshot, dict):
            task_id = snapshot.get("id")
        _put(found, "phasewatch.task.id", task_id)
    return found


def _put(found: dict[str, Any], key: str, value: object) -> None:
    if isinstance(value, str) and value:
        found[key] = value[:_MAX_ID]


class CommitSpan(_Span):
    """``store.commit``; see the module's description."""

    __slots__ = ("_scope", "_span", "_state")

    def __init__(self, state: _State, source: str, receipts: Sequence[Receipt | None]) -> None:
        links = [state.link(r.traceparent) for r in receipts if r is not None and r.traceparent]
        self._state = state
        self._scope = state.tracer.start_as_current_span(
            "store.commit",
            links=links,
            attributes={"phasewatch.source": source, "phasewatch.batch.size": len(receipts)},
            record_exception=False,
            set_status_on_exception=False,
        )
        self._span: Span | None = None

    def __enter__(self) -> CommitSpan:
        self._span = self._scope.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None and self._span is not None:
            self._span.set_attribute("phasewatch.outcome", "failed")
            self._span.set_attribute("error.type", kind.__qualname__)
            self._span.set_status(self._state.error(kind.__qualname__))
        self._scope.__exit__(kind, exc, tb)

    def committed(self, outcomes: Iterable[Outcome | Rejected], changes: int) -> None:
        if self._span is None or not self._span.is_recording():
            return
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        for outcome in outcomes:
            word = str(outcome)
            counts[word if word in counts else "rejected"] += 1
        self._span.set_attributes(
            {
                "phasewatch.outcome": "committed",
                "phasewatch.batch.accepted": counts["accepted"],
                "phasewatch.batch.duplicates": counts["duplicate"],
                "phasewatch.batch.rejected": counts["rejected"],
                "phasewatch.changes": changes,
            }
        )


class _NoCommit(_Span):
    __slots__ = ()

    def __enter__(self) -> _NoCommit:
        return self

    def committed(self, outcomes: Iterable[Outcome | Rejected], changes: int) -> None:
        return None


_NO_COMMIT = _NoCommit()


def committing(source: str, receipts: Sequence[Receipt | None]) -> CommitSpan | _NoCommit:
    """A ``store.commit`` span for a batch of messages with these receipts (linked to
    each request with a traceparent); a no-op while tracing is off."""
    state = _state
    return _NO_COMMIT if state is None else CommitSpan(state, source, receipts)


Call = Callable[[], Awaitable[Any]]


class DeliverySpan(_Span):
    """``handler.deliver``; see the module's description."""

    __slots__ = ("_scope", "_span", "_state")

    def __init__(self, state: _State, handler: str, change: PhaseChange) -> None:
        parent = state.parent_of(change.traceparent) if change.traceparent else None
        self._state = state
        self._scope = state.tracer.start_as_current_span(
            "handler.deliver",
            context=parent,
            attributes={
                "phasewatch.handler": handler,
                "phasewatch.task.id": change.task_id,
                "phasewatch.event.id": change.event_id,
                "phasewatch.change.seq": change.seq,
                "phasewatch.change.kind": change.kind,
                "phasewatch.change.phase": change.phase,
                "phasewatch.delivery.attempt": change.attempt,
            },
            record_exception=False,
            set_status_on_exception=False,
        )
        self._span: Span | None = None

    def __enter__(self) -> DeliverySpan:
        self._span = self._scope.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if span is not None:
            outcome = _delivery_outcome(exc)
            span.set_attribute("phasewatch.outcome", outcome)
            if kind is not None:
                span.set_attribute("error.type", kind.__qualname__)
                span.set_status(self._state.error(outcome))
        self._scope.__exit__(kind, exc, tb)

    def call(self, fn: Callable[[PhaseChange], Awaitable[Any]], change: PhaseChange) -> Call:
        """The handler call to make: ``fn`` given ``change`` with its ``traceparent`` this
        span's context, and this span current where the call runs (the handler's own
        loop, on a thread of its own: the span is attached there, in the call's task)."""
        span, state = self._span, self._state
        if span is None:
            return lambda: fn(change)
        traceparent = _traceparent(span)
        if traceparent is not None:
            change = replace(change, traceparent=traceparent)
        context = state.in_context(span)

        async def traced() -> Any:
            token = state.attach(context)
            try:
                return await fn(change)
            finally:
                state.detach(token)

        return traced


class _NoDelivery(_Span):
    __slots__ = ()

    def __enter__(self) -> _NoDelivery:
        return self

    def call(self, fn: Callable[[PhaseChange], Awaitable[Any]], change: PhaseChange) -> Call:
        return lambda: fn(change)


_NO_DELIVERY = _NoDelivery()


def delivering(handler: str, change: PhaseChange) -> DeliverySpan | _NoDelivery:
    """A ``handler.deliver`` span for one attempt of ``change`` to ``handler``, a child
    of the change's stored traceparent; a no-op while tracing is off."""
    state = _state
    return _NO_DELIVERY if state is None else DeliverySpan(state, handler, change)


def _delivery_outcome(exc: BaseException | None) -> str:
    from consumer.dispatch.subscription import PermanentError  # noqa: PLC0415 - no cycle

    if exc is None:
        return "ok"
    if isinstance(exc, PermanentError):
        return "permanent_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"
