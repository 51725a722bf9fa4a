"""The built-in HTTP notifier: POST each phase change, signed, to one URL.

The body is the change's :meth:`~consumer.PhaseChange.summary` as compact JSON: the
change and a task summary, credentials already hidden (spec §1); task params, where
credentials live, are never sent. Requests are signed as Standard Webhooks
(:mod:`handlers.signing`). The change's
:attr:`~consumer.PhaseChange.idempotency_key` is sent three times, always equal:

* ``webhook-id`` (Standard Webhooks calls it the idempotency key; it is also signed);
* ``Idempotency-Key: "<key>"``, a Structured Fields string, as the IETF
  ``draft-ietf-httpapi-idempotency-key-header`` specifies (the key needs no escaping);
* ``idempotencyKey`` in the body.

It is the same on every retry, redelivery and replica, differs per handler name and per
replay run, so the receiver can deduplicate on it; ``webhook-attempt`` counts
deliveries of the change. ``traceparent`` is the change's
:attr:`~consumer.PhaseChange.traceparent`, when it has one: with tracing on
(:mod:`consumer.tracing`), the context of this attempt's ``handler.deliver`` span;
otherwise the webhook request's own. The body does not carry it (it is the same on
every attempt).

How a response is judged, so that the dispatcher retries only what retrying can fix:

* 2xx: delivered.
* 408, 429, 5xx, a timeout, a connection error: :class:`NotifyError`, retried with backoff.
* any other 4xx and 3xx (redirects are not followed: a signed POST must not be replayed
  elsewhere, and the configured URL should be the final one):
  :class:`consumer.PermanentError`, dead-lettered at once.

Credentials in the configured URL (``https://user:pass@host/hook``) are sent as HTTP Basic
auth to that host only, and never appear in logs or exception messages, which name the
target without userinfo or query string.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterable

import aiohttp
import orjson
from yarl import URL

from consumer import DeliveryPolicy, PermanentError, PhaseChange, Subscription, redact
from handlers.signing import InvalidNotification, sign, signing_key, verify_notification
from handlers.subscribe import DEFAULT_POLICY, phase_set, subscription, type_set

__all__ = ["InvalidNotification", "NotifyError", "http_notify", "verify_notification"]

log = logging.getLogger(__name__)

USER_AGENT = "phasewatch"
_EXCERPT_BYTES = 200
# Status codes that say "not now" rather than "never".
_RETRYABLE_4XX = frozenset({408, 429})
# The dispatcher's own per-call timeout is a backstop: ours fires first with a clearer message.
_DISPATCH_TIMEOUT_MARGIN_S = 5.0


class NotifyError(Exception):
    """A delivery that may succeed later (receiver down, slow, overloaded): retried."""


class _Notifier:
    """One target, one secret, one ``aiohttp.ClientSession`` shared by every call."""

    def __init__(self, url: str, secret: str | bytes, *, name: str, timeout_s: float) -> None:
        try:
            parsed = URL(url)
        except (TypeError, ValueError):
            # yarl's message may quote the URL, credentials included.
            raise ValueError(f"{name}: the URL is not a valid URL: {_shown(url)}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{name}: the URL must be http(s)://host/..., got {_shown(url)}")
        self._key = signing_key(secret)
        self._session_headers = {"User-Agent": USER_AGENT}
        if parsed.user is not None:
            # Built by hand: aiohttp's BasicAuth/auth= are deprecated in 3.14, and the
            # replacement helper does not exist in the older 3.x this package supports.
            pair = f"{parsed.user}:{parsed.password or ''}".encode()
            self._session_headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        # The request URL carries no userinfo, so aiohttp's own errors cannot leak it.
        self._url = parsed.with_user(None)
        self.target = _shown(url)
        self._name = name
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers=self._session_headers
            )

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __call__(self, change: PhaseChange) -> None:
        if self._session is None or self._session.closed:
            # on_start is the normal path; this keeps a handler called outside the service
            # (a test, a script) working instead of failing every attempt.
            await self.start()
        assert self._session is not None  # for mypy: start() sets it
        body = orjson.dumps(change.summary())
        msg_id = change.idempotency_key
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": f'"{msg_id}"',
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, msg_id, timestamp, body),
            "webhook-attempt": str(change.attempt),
        }
        if change.traceparent is not None:
            headers["traceparent"] = change.traceparent
        what = f"{self._name}: POST change {change.seq} ({msg_id}) to {self.target}"
        started = time.monotonic()
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    log.debug(
                        "%s: %d in %.0f ms", what, status, (time.monotonic() - started) * 1000
                    )
                    return
                excerpt = await _excerpt(response)
                reason = f"{status} {response.reason or ''}".strip()
                if status >= 500 or status in _RETRYABLE_4XX:
                    retry_after = response.headers.get("Retry-After")
                    hint = f" (Retry-After: {redact(retry_after)})" if retry_after else ""
                    raise NotifyError(f"{what}: {reason}{hint}{excerpt}")
                if 300 <= status < 500:
                    location = response.headers.get("Location")
                    moved = f" (redirect to {_shown(location)} not followed)" if location else ""
                    raise PermanentError(f"{what}: {reason}{moved}{excerpt}")
                raise NotifyError(f"{what}: unexpected status {reason}{excerpt}")
        except TimeoutError:
            # aiohttp's own timeouts; the dispatcher's cancellation is a CancelledError.
            raise NotifyError(f"{what}: no response within {self._timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            # ``from None``: aiohttp's exception may render the request; our message is
            # already complete and redacted.
            # The query string may hold a token: name the request by its target instead.
            detail = redact(str(exc)).replace(str(self._url), self.target) or "no detail"
            raise NotifyError(f"{what}: {type(exc).__name__}: {detail}") from None


def _shown(url: str) -> str:
    """The URL fit for logs: no userinfo, no query or fragment (tokens live there)."""
    try:
        parsed = URL(url)
        if parsed.is_absolute():  # a Location header may be relative: no userinfo to cut
            parsed = parsed.with_user(None)
        shown = str(parsed.with_query(None).with_fragment(None))
    except (TypeError, ValueError):
        shown = "<unparsable URL>"
    result: str = redact(shown)
    return result


async def _excerpt(response: aiohttp.ClientResponse) -> str:
    """A short, single-line start of the response body, for the error message."""
    chunks: list[bytes] = []
    size = 0
    while size < _EXCERPT_BYTES:
        chunk = await response.content.read(_EXCERPT_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    text = " ".join(b"".join(chunks).decode("utf-8", errors="replace").split())
    if not text:
        return ""
    more = "..." if size >= _EXCERPT_BYTES else ""
    shown: str = redact(text)
    return f": {shown}{more}"


def http_notify(
    url: str,
    secret: str | bytes,
    *,
    phases: str | Iterable[str] = (),
    types: str | Iterable[str] = (),
    updates: bool = False,
    timeout_s: float = 10.0,
    name: str = "http-notify",
    concurrency: int = DEFAULT_POLICY.concurrency,
    max_attempts: int = DEFAULT_POLICY.max_attempts,
    max_age_s: float = DEFAULT_POLICY.max_age_s,
    backoff_s: float = DEFAULT_POLICY.backoff_s,
    max_backoff_s: float = DEFAULT_POLICY.max_backoff_s,
) -> Subscription:
    """A subscription POSTing each matching change to ``url``, signed with ``secret``.

    ``secret``: ``whsec_<base64>`` (Standard Webhooks) or any string; receivers check it
    with :func:`verify_notification`. ``phases``/``types``: only these (empty: all).
    ``timeout_s``: per request (its own default: a receiver should answer well within
    the dispatcher's 30 s). The delivery policy's defaults are
    :class:`consumer.DeliveryPolicy`'s. ``name`` goes into every idempotency key
    (``webhook-id``): keep it stable, or receivers will not recognise redeliveries
    across a rename.
    """
    if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    notifier = _Notifier(url, secret, name=name, timeout_s=timeout_s)
    return subscription(
        notifier,
        name=name,
        phases=phase_set(phases, what="phases"),
        types=type_set(types, what="types"),
        updates=updates,
        policy=DeliveryPolicy(
            concurrency=concurrency,
            timeout_s=timeout_s + _DISPATCH_TIMEOUT_MARGIN_S,
            max_attempts=max_attempts,
            max_age_s=max_age_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        ),
        on_start=notifier.start,
        on_stop=notifier.stop,
        extra={"target": notifier.target},
    )
