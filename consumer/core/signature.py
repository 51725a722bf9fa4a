"""``Livepeer-Signature`` verification (spec §2). Pure: the clock is an argument.

Header: ``t=<ms>,v1=<hex>[,v1=<hex>...]``. ``v1`` is HMAC-SHA256 keyed with the webhook's
shared secret over the **raw request body bytes** (not ``t.body``), so verification must
run on the bytes as received, before any parsing. Several ``v1`` values are accepted
(secret rotation). Livepeer enforces no freshness window; the receiver picks one by
comparing ``t`` with its clock, both in milliseconds. A tolerance of 0 disables the check
(for replaying archived deliveries).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["SignatureError", "sign", "verify"]


class SignatureError(ValueError):
    """The delivery is not provably from the holder of the secret (HTTP 401)."""


def sign(secret: bytes, body: bytes, timestamp_ms: int) -> str:
    """A header value as Livepeer would send it (for ``phasewatch send`` and tests)."""
    digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return f"t={timestamp_ms},v1={digest}"


def verify(
    header: str | None,
    body: bytes,
    secret: bytes,
    *,
    now_ms: int,
    tolerance_ms: int,
) -> int:
    """Check a ``Livepeer-Signature`` header; return its timestamp or raise SignatureError."""
    if not header:
        raise SignatureError("missing Livepeer-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed Livepeer-Signature header: expected t=<ms>,v1=<hex>")
        if name == "t":
            if not value.isdigit():
                raise SignatureError("malformed Livepeer-Signature header: t is not a number")
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value.strip().lower())
        # Other schemes (v0, future versions) are ignored, as Stripe-style receivers do.
    if timestamp is None or not candidates:
        raise SignatureError("malformed Livepeer-Signature header: expected t=<ms>,v1=<hex>")
    if tolerance_ms > 0 and abs(now_ms - timestamp) > tolerance_ms:
        raise SignatureError(
            f"signature timestamp {timestamp} is outside the {tolerance_ms // 1000} s window"
        )
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    # Compare against every candidate so timing does not reveal which one matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("signature does not match the body")
    return timestamp
