"""``Livepeer-Signature`` verification (spec §2). Pure: the clock is an argument.

Header: ``t=<ms>,v1=<hex>[,v1=<hex>...]``. ``v1`` is HMAC-SHA256 keyed with the webhook's
shared secret over the **raw request body bytes** (not ``t.body``), so verification must
run on the bytes as received, before any parsing. Several ``v1`` values are accepted
(secret rotation). Livepeer enforces no freshness window; the receiver picks one by
comparing ``t`` with its clock, both in milliseconds. A tolerance of 0 disables the check
(for replaying archived deliveries).

The receiver may hold several secrets (several Livepeer projects, a rotation):
:func:`parse_secrets` reads them from ``PHASEWATCH_WEBHOOK_SECRET`` and
:func:`verify_any` says which one signed a delivery. It computes the HMAC of every
secret and compares it with every ``v1`` value, whatever matches, so the time it takes
reveals neither whether nor which secret matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "SECRET_NAME",
    "SignatureError",
    "WebhookSecret",
    "parse_secrets",
    "sign",
    "verify",
    "verify_any",
]


class SignatureError(ValueError):
    """The delivery is not provably from the holder of the secret (HTTP 401)."""


def sign(secret: bytes, body: bytes, timestamp_ms: int) -> str:
    """A header value as Livepeer would send it (for ``phasewatch send`` and tests)."""
    digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return f"t={timestamp_ms},v1={digest}"


@dataclass(frozen=True, slots=True)
class WebhookSecret:
    """One webhook secret and the name the history records for it: the name given in
    ``name=secret``, else its 0-based index in the list, as a string. The key is never
    shown (not in ``repr``)."""

    name: str
    key: bytes = field(repr=False)


SECRET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
"""What a secret's name may be: a letter, then up to 63 letters, digits, ``_``, ``.``
or ``-`` (so it can never be taken for an index)."""

_VARIABLE = "PHASEWATCH_WEBHOOK_SECRET"


def parse_secrets(value: str | bytes) -> tuple[WebhookSecret, ...]:
    """The secrets of a ``PHASEWATCH_WEBHOOK_SECRET`` value: a comma-separated list, each
    item a secret or ``name=secret``; spaces around items, names and secrets are ignored.

    An item is read as ``name=secret`` when the text before its first ``=`` is a name
    (:data:`SECRET_NAME`) and the text after it is not empty and does not start with
    ``=``; any other item is a secret as it stands (so a base64 secret, whose ``=`` are
    padding at its end, needs no name). A secret holding ``=`` elsewhere must be given
    a name (``name=se=cret``). Unnamed secrets are named by their index.

    Raises ValueError, with a message that never quotes a secret, for an empty value
    or item, a name given twice, or a secret listed twice.
    """
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    if not text.strip():
        raise ValueError(
            "is empty: give one secret or a comma-separated list (unset it to accept"
            " unsigned webhooks)"
        )
    items = text.split(",")
    secrets: list[WebhookSecret] = []
    for index, raw_item in enumerate(items):
        item = raw_item.strip()
        if not item:
            raise ValueError(
                f"the item at index {index} (0-based) of {len(items)} is empty: a stray comma?"
            )
        name, sep, rest = item.partition("=")
        name, rest = name.strip(), rest.strip()
        if sep and SECRET_NAME.fullmatch(name) and rest and not rest.startswith("="):
            secrets.append(WebhookSecret(name, rest.encode("utf-8", "surrogateescape")))
        else:
            secrets.append(WebhookSecret(str(index), item.encode("utf-8", "surrogateescape")))
    seen_names: set[str] = set()
    seen_keys: dict[bytes, int] = {}
    for index, secret in enumerate(secrets):
        if secret.name in seen_names:
            raise ValueError(f"the name {secret.name!r} is given to two secrets")
        seen_names.add(secret.name)
        if (first := seen_keys.setdefault(secret.key, index)) != index:
            raise ValueError(f"the items at indexes {first} and {index} are the same secret")
    return tuple(secrets)


def verify(
    header: str | None,
    body: bytes,
    secret: bytes,
    *,
    now_ms: int,
    tolerance_ms: int,
) -> int:
    """Check a ``Livepeer-Signature`` header against one secret; return its timestamp or
    raise SignatureError."""
    timestamp, _ = verify_any(
        header, body, (WebhookSecret("0", secret),), now_ms=now_ms, tolerance_ms=tolerance_ms
    )
    return timestamp


def verify_any(
    header: str | None,
    body: bytes,
    secrets: Sequence[WebhookSecret],
    *,
    now_ms: int,
    tolerance_ms: int,
) -> tuple[int, WebhookSecret]:
    """Check a ``Livepeer-Signature`` header against each of ``secrets``; return its
    timestamp and the first secret (in list order) that signed it, or raise
    SignatureError. Every secret's HMAC is computed and compared with every ``v1``
    value (``hmac.compare_digest``), without stopping at a match."""
    if not secrets:
        raise ValueError("no secret to verify with")
    timestamp, candidates = _parse(header, now_ms=now_ms, tolerance_ms=tolerance_ms)
    matches: list[bool] = []
    for secret in secrets:
        expected = hmac.new(secret.key, body, hashlib.sha256).hexdigest().encode()
        # Compare against every candidate so timing does not reveal which one matched.
        matched = False
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
        matches.append(matched)
    for secret, matched in zip(secrets, matches, strict=True):
        if matched:
            return timestamp, secret
    raise SignatureError("signature does not match the body")


def _parse(header: str | None, *, now_ms: int, tolerance_ms: int) -> tuple[int, list[bytes]]:
    """The header's timestamp (checked against the window) and its ``v1`` values."""
    if not header:
        raise SignatureError("missing Livepeer-Signature header")
    timestamp: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed Livepeer-Signature header: expected t=<ms>,v1=<hex>")
        if name == "t":
            if not (value.isascii() and value.isdigit()):  # int() takes other digits
                raise SignatureError("malformed Livepeer-Signature header: t is not a number")
            timestamp = int(value)
        elif name == "v1":
            # As bytes: compare_digest refuses a str that is not ASCII (a header may
            # carry any byte); such a value simply does not match.
            candidates.append(value.strip().lower().encode("utf-8", "surrogateescape"))
        # Other schemes (v0, future versions) are ignored, as Stripe-style receivers do.
    if timestamp is None or not candidates:
        raise SignatureError("malformed Livepeer-Signature header: expected t=<ms>,v1=<hex>")
    if tolerance_ms > 0 and abs(now_ms - timestamp) > tolerance_ms:
        raise SignatureError(
            f"signature timestamp {timestamp} is outside the {tolerance_ms // 1000} s window"
        )
    return timestamp, candidates
