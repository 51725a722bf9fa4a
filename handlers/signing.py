"""Standard Webhooks signatures for the notifications phasewatch sends. Pure: the clock is
an argument.

phasewatch signs what :func:`handlers.http_notify` POSTs the way Standard Webhooks
(standardwebhooks.com, also used by Svix) does, so receivers can use any of its libraries
or :func:`verify_notification`:

* ``webhook-id``: the delivery's id, the same on every retry (the receiver's
  idempotency key);
* ``webhook-timestamp``: Unix seconds when this attempt was signed;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``,
  several space-separated during a secret rotation.

The key is the base64-decoded part after ``whsec_`` when the secret has that prefix,
otherwise the secret's UTF-8 bytes. Error messages never contain the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["InvalidNotification", "sign", "signing_key", "verify_notification"]

_PREFIX = "whsec_"


class InvalidNotification(ValueError):
    """The notification is not provably from phasewatch: answer 401 (or 400) and drop it."""


def signing_key(secret: str | bytes) -> bytes:
    """The HMAC key for a secret: ``whsec_<base64>`` decoded, any other string as UTF-8
    bytes, bytes as they are."""
    if isinstance(secret, bytes):
        key = secret
    elif isinstance(secret, str):
        if secret.startswith(_PREFIX):
            try:
                key = base64.b64decode(secret[len(_PREFIX) :], validate=True)
            except (binascii.Error, ValueError):
                # Say what is wrong without echoing any part of the secret.
                raise ValueError(
                    "the secret starts with whsec_ but the rest is not valid base64"
                ) from None
        else:
            key = secret.encode()
    else:
        raise TypeError(f"a secret must be str or bytes, not {type(secret).__name__}")
    if not key:
        raise ValueError("the secret is empty")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_notification(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a notification as received and return its JSON body.

    ``headers``: the request headers (any mapping; names compared case-insensitively).
    ``body``: the raw body as received, before any parsing. ``tolerance_s``: how far the
    signed timestamp may be from ``now`` (Unix seconds, default the clock) either way;
    0 disables the check. Raises :class:`InvalidNotification` (a ValueError) when a
    header is missing or malformed, the timestamp is outside the window, no signature
    matches, or the body is not a JSON object.
    """
    key = signing_key(secret)
    raw = body.encode() if isinstance(body, str) else bytes(body)
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "").strip()
    signatures = lowered.get("webhook-signature", "")
    if not msg_id or not stamp or not signatures:
        raise InvalidNotification(
            "missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    if not stamp.isdigit():
        raise InvalidNotification("webhook-timestamp is not a number of seconds")
    timestamp = int(stamp)
    if tolerance_s > 0:
        current = time.time() if now is None else now
        if abs(current - timestamp) > tolerance_s:
            raise InvalidNotification(
                f"webhook-timestamp {timestamp} is outside the {tolerance_s:g} s window "
                f"around {int(current)}"
            )
    expected = sign(key, msg_id, timestamp, raw).encode()
    candidates = [
        candidate.encode()
        for candidate in signatures.split()
        # Other versions (v1a: asymmetric) may sit alongside; only v1 is ours.
        if candidate.startswith("v1,")
    ]
    # Compare with every candidate so the timing does not reveal which one matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise InvalidNotification("no webhook-signature matches the body")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidNotification("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise InvalidNotification("the body is not a JSON object")
    return payload
