"""The Livepeer webhook receiver: ``POST /webhooks/livepeer``, signed (spec §2).

Status codes follow from Livepeer's retry policy: it retries 5xx and timeouts for about
a day and never retries a 4xx. So a 2xx means the event is committed (or was already), a
4xx means the input can never succeed, and a 5xx (503) is reserved for our own faults,
when a retry may well succeed::

    200  accepted, or a duplicate of an accepted event
    400  not JSON, not an event envelope, or a Content-Encoding that does not decode
    415  a Content-Encoding other than gzip or deflate
    401  missing, malformed or wrong signature; stale signature timestamp
    413  body above the size limit
    422  an event whose task cannot be used (no id, no status.phase, ...)
    503  the store could not commit; retry

The signature is checked over the body bytes Livepeer signed (spec §2): the request body
as received, after undoing any ``Content-Encoding`` a proxy may have applied (Livepeer
itself sends none), against every configured secret (constant time across the list,
:func:`~consumer.core.signature.verify_any`). A body whose encoding does not decode gets
400. The body goes to an :class:`EventSink` (the store's group-commit ingestor, or a
Kafka topic in forward mode), which decodes it where it is stored, with its
:class:`~consumer.core.receipt.Receipt`: the name (or index) of the secret that verified
it, and the request's ``traceparent`` header when it is a valid W3C one. With tracing on
(:mod:`consumer.tracing`), each request is a ``webhook.receive`` span continuing that
header, and the receipt keeps the span's own context instead, so that the commit and
the deliveries it leads to join the request's trace.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from consumer import tracing
from consumer.api.responses import bad_encoding, error, json_response
from consumer.core.codec import HTTP_STATUS
from consumer.core.receipt import Receipt, valid_traceparent
from consumer.core.signature import SignatureError, WebhookSecret, parse_secrets, verify_any
from consumer.core.times import now_ms
from consumer.store.base import Rejected

__all__ = ["WEBHOOK_PATH", "BadBody", "EventSink", "WebhookConfig", "decoded", "webhook_handler"]

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/livepeer"

RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """``secret``: the ``PHASEWATCH_WEBHOOK_SECRET`` value, one secret or a
    comma-separated list of them, each optionally ``name=secret`` (see
    :func:`~consumer.core.signature.parse_secrets`); None: unsigned webhooks are accepted
    (warned at start). ``secrets``: the list it holds."""

    secret: bytes | None = field(default=None, repr=False)
    tolerance_ms: int = 300_000
    max_body_bytes: int = 1024 * 1024
    secrets: tuple[WebhookSecret, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        secrets = () if self.secret is None else parse_secrets(self.secret)
        object.__setattr__(self, "secrets", secrets)


class EventSink(Protocol):
    """Where a verified webhook body goes: the store (via the group-commit ingestor) or,
    in forward mode, a Kafka topic. Returns a status word once the event is durable, or
    what is wrong with the body (nothing of it is kept then)."""

    async def submit(self, raw: bytes, receipt: Receipt | None = None) -> str | Rejected: ...


def webhook_handler(sink: EventSink, config: WebhookConfig) -> RequestHandler:
    """The ``POST /webhooks/livepeer`` handler: verify, hand the body to ``sink``, answer."""

    async def receive_webhook(request: web.Request) -> web.Response:
        return await _receive(request, sink, config)

    return receive_webhook


async def _receive(request: web.Request, sink: EventSink, config: WebhookConfig) -> web.Response:
    trace = tracing.receiving(*_incoming_trace(request)) if tracing.enabled() else None
    if trace is None:
        response, _ = await _answer(request, sink, config, None)
        return response
    with trace:
        response, outcome = await _answer(request, sink, config, trace)
        trace.answered(response.status, outcome)
        return response


async def _answer(
    request: web.Request,
    sink: EventSink,
    config: WebhookConfig,
    trace: tracing.ReceiveSpan | None,
) -> tuple[web.Response, str]:
    """The answer, and what it says in a word (the status, or the error code)."""
    length = request.content_length
    if length is not None and length > config.max_body_bytes:
        return _too_large(config), "too_large"
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _too_large(config), "too_large"
    except web.RequestPayloadError:
        return bad_encoding(), "bad_encoding"
    try:
        body = decoded(body, request.headers.get("Content-Encoding"), config.max_body_bytes)
    except BadBody as exc:
        return error(exc.status, exc.code, str(exc)), exc.code
    verified_by: str | None = None
    if config.secrets:
        try:
            _, secret = verify_any(
                request.headers.get("Livepeer-Signature"),
                body,
                config.secrets,
                now_ms=now_ms(),
                tolerance_ms=config.tolerance_ms,
            )
        except SignatureError as exc:
            return error(401, "bad_signature", str(exc)), "bad_signature"
        verified_by = secret.name
    if trace is not None:
        trace.verified(body, verified_by)
    receipt = _receipt(request, verified_by, trace)
    try:
        # Decoded where it is stored (by default in the writer process): a body that is
        # not an event comes back rejected, with what is wrong.
        outcome = await sink.submit(body, receipt)
    except Exception:
        # Our fault, not the sender's: 503 so Livepeer retries later.
        log.exception("could not make a webhook body durable")
        message = "event not committed; retry later"
        return error(503, "store_unavailable", message), "store_unavailable"
    if isinstance(outcome, Rejected):
        return error(HTTP_STATUS[outcome.reason], outcome.reason, outcome.message), outcome.reason
    return json_response({"status": str(outcome)}), str(outcome)


def _single(request: web.Request, name: str) -> str | None:
    """The value of header ``name`` when the request carries it exactly once."""
    found = request.headers.getall(name, [])
    return found[0] if len(found) == 1 else None


def _incoming_trace(request: web.Request) -> tuple[str | None, str | None]:
    """The request's W3C trace context: exactly one valid ``traceparent`` (normalised to
    version 00), and its ``tracestate``; (None, None) without one."""
    traceparent = valid_traceparent(_single(request, "traceparent"))
    if traceparent is None:
        return None, None
    return traceparent, _single(request, "tracestate")


def _receipt(
    request: web.Request, verified_by: str | None, trace: tracing.ReceiveSpan | None
) -> Receipt | None:
    """What the history keeps of how this delivery came: the secret's name, and the W3C
    trace context: with tracing on, the ``webhook.receive`` span's (so that the changes
    the event causes point at this request's span), else the request's own when it
    carries exactly one valid ``traceparent``."""
    if trace is not None:
        traceparent = trace.traceparent()
    else:
        traceparent = valid_traceparent(_single(request, "traceparent"))
    if verified_by is None and traceparent is None:
        return None
    return Receipt(verified_by, traceparent)


class BadBody(ValueError):
    """A body whose Content-Encoding cannot be undone; ``status`` and ``code`` for the
    answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decoded(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` with its Content-Encoding undone, at most ``limit`` bytes of it. This app
    turns aiohttp's own decompression off (``auto_decompress``): a body that does not
    decode then gets a JSON 400 from here, not a text error from the HTTP parser, and a
    small body that inflates past the size limit is refused (413) without inflating it
    all."""
    coding = (encoding or "").strip().lower()
    if coding in ("", "identity"):
        return body
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise BadBody(415, "unsupported_encoding", "Content-Encoding must be gzip or deflate")
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(body, limit + 1)
        if coding == "deflate" and not out and not inflater.eof:
            # Some senders mean raw deflate, without the zlib header.
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise BadBody(400, "bad_encoding", f"the body is not valid {coding} data") from None
    if len(out) > limit:
        raise BadBody(413, "too_large", f"body exceeds the {limit} byte limit once decoded")
    if not inflater.eof or inflater.unused_data:
        raise BadBody(400, "bad_encoding", f"the body is truncated or trails {coding} data")
    return out


def _too_large(config: WebhookConfig) -> web.Response:
    return error(413, "too_large", f"body exceeds the {config.max_body_bytes} byte limit")
