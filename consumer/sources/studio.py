"""Livepeer Studio's task list, ``GET {url}/task`` (spec §7): the one module that talks
to Studio. It asks for one page and retries what is worth retrying; how pages make a
safe walk is :mod:`consumer.sources.reconcile`'s business.

A page is asked for in ascending ``updatedAt`` (Studio's default is newest first), with
a ``gte`` range filter (never an equality filter: Studio's are not reliable) and an
explicit ``limit`` (Studio's default is 20; it serves at most 1000). The ``Link:
rel="next"`` answer is read for its ``cursor`` only: the next request is built on the
configured URL, so the key is never sent to a host a header names.

Errors form one small hierarchy; ``kind`` is the label of the errors metric::

    StudioError                      a page could not be had
    ├── AuthError        auth        401/403: the key is wrong or revoked (never retried)
    ├── RateLimited      rate_limited  429, after the retries (each waits Retry-After)
    ├── ServerError      server      5xx, after the retries (backoff)
    ├── NetworkError     network     no answer (refused, reset, timeout), after the retries
    └── BadResponse      response    an answer that cannot be a task list (another 4xx,
                                     not a JSON array, pages not in the order asked for)

The key goes in the ``Authorization`` header and nowhere else: never in a message, a
log line or a URL shown (URLs are shown without their query, through ``redact_text``).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from consumer import __version__
from consumer.core.backoff import Backoff, Retries
from consumer.core.secrets import redact_text

__all__ = [
    "MAX_LIMIT",
    "AuthError",
    "BadResponse",
    "NetworkError",
    "Page",
    "RateLimited",
    "ServerError",
    "StudioClient",
    "StudioError",
    "StudioStats",
]

MAX_LIMIT = 1000
"""The most tasks Studio serves per page."""

ASCENDING = "updatedAt-false,id-false"
"""``order``: oldest update first (Studio's ``FIELD-true`` is descending), ties by id so
that a cursor walks a stable order."""


class StudioError(Exception):
    """A page of Studio's task list could not be had. The message is one line."""

    kind = "response"


class AuthError(StudioError):
    kind = "auth"


class RateLimited(StudioError):
    kind = "rate_limited"


class ServerError(StudioError):
    kind = "server"


class NetworkError(StudioError):
    kind = "network"


class BadResponse(StudioError):
    kind = "response"


@dataclass(slots=True)
class StudioStats:
    """Requests made and failed, cumulative (the metrics read them)."""

    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by StudioError.kind


@dataclass(frozen=True, slots=True)
class Page:
    """One answer: its tasks as received, whether Studio said there is more (``Link:
    rel="next"``) and the cursor it gave, and ``X-Total-Count`` when asked for."""

    tasks: list[dict[str, Any]]
    more: bool
    cursor: str | None = None
    total: int | None = None


Sleep = Callable[[float], Awaitable[None]]


class StudioClient:
    """``list_tasks`` pages of ``{base_url}/task`` with ``api_key``. Retries 429 (waiting
    what ``Retry-After`` says, at most ``max_wait_s``), 5xx and network errors (with
    ``backoff``) up to ``attempts`` tries per page. ``sleep`` is how it waits (tests
    record the waits instead of sitting them out)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        attempts: int = 8,
        backoff: Backoff | None = None,
        max_wait_s: float = 300.0,
        stats: StudioStats | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self._url = URL(base_url.rstrip("/") + "/task")
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json",
            "User-Agent": f"phasewatch/{__version__}",
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._attempts = attempts
        self._backoff = backoff or Backoff(initial_s=1.0, max_s=60.0)
        self._max_wait_s = max_wait_s
        self._sleep = sleep
        self.stats = stats if stats is not None else StudioStats()
        self._session: aiohttp.ClientSession | None = None

    @property
    def shown_url(self) -> str:
        """The task list's URL as messages show it: no query, no userinfo."""
        return redact_text(str(self._url.with_query(None)))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> StudioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def list_tasks(
        self,
        *,
        updated_since: int | float,
        limit: int = MAX_LIMIT,
        cursor: str | None = None,
        count: bool = False,
    ) -> Page:
        """Tasks with ``status.updatedAt >= updated_since``, oldest update first; from
        ``cursor`` (a previous page's) when given."""
        query = {
            "limit": str(min(max(limit, 1), MAX_LIMIT)),
            "order": ASCENDING,
            "filters": orjson.dumps(
                [{"id": "updatedAt", "value": {"gte": updated_since}}]
            ).decode(),
        }
        if cursor is not None:
            query["cursor"] = cursor
        if count:
            query["count"] = "1"
        url = self._url.with_query(query)
        retries = Retries(self._backoff)
        while True:
            try:
                return await self._get(url)
            except (RateLimited, ServerError, NetworkError) as exc:
                self.stats.errors[exc.kind] += 1
                if retries.failures + 1 >= self._attempts:
                    raise
                delay = retries.failed()
                if isinstance(exc, _Retryable) and exc.retry_after is not None:
                    delay = exc.retry_after
                await self._sleep(min(delay, self._max_wait_s))
            except StudioError as exc:
                self.stats.errors[exc.kind] += 1
                raise

    async def _get(self, url: URL) -> Page:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        self.stats.requests += 1
        where = self.shown_url
        try:
            async with self._session.get(url, headers=self._headers, allow_redirects=False) as r:
                body = await r.read()
                status = r.status
                headers = r.headers
                links = r.links
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc)
            raise NetworkError(f"no answer from {where}: {redact_text(reason)}") from None
        if status in (401, 403):
            raise AuthError(
                f"Livepeer Studio refused the API key (HTTP {status} from {where}): check "
                "PHASEWATCH_LIVEPEER_API_KEY"
            )
        if status == 429:
            raise _RateLimited(
                f"Livepeer Studio rate-limited us (HTTP 429 from {where})",
                retry_after(headers.get("Retry-After")),
            )
        if status >= 500:
            raise _ServerError(
                f"Livepeer Studio failed (HTTP {status} from {where})",
                retry_after(headers.get("Retry-After")),
            )
        if status != 200:
            raise BadResponse(
                f"unexpected HTTP {status} from {where} (check PHASEWATCH_LIVEPEER_API_URL)"
            )
        try:
            tasks = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadResponse(f"{where} answered something that is not JSON") from None
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BadResponse(f"{where} answered JSON that is not an array of tasks")
        nxt = links.get("next")
        cursor = None
        if nxt is not None:
            cursor = URL(str(nxt.get("url", ""))).query.get("cursor")
        total = headers.get("X-Total-Count")
        return Page(
            tasks,
            more=nxt is not None,
            cursor=cursor,
            total=int(total) if total is not None and total.isdigit() else None,
        )


class _Retryable(StudioError):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _RateLimited(_Retryable, RateLimited):
    pass


class _ServerError(_Retryable, ServerError):
    pass


def retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait: delta-seconds or an HTTP-date
    (RFC 9110 §10.2.3); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
