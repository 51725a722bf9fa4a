"""Hide the credentials a task can carry (spec §1) before it leaves phasewatch. Pure.

The store keeps tasks exactly as received (a faithful fold, replayable history). Every
exit — the API, the CLI, logs, handler notifications, the dashboard — goes through
:func:`redact` first. Redaction is by shape, anywhere in the document, rather than only at
the documented paths, so a credential Livepeer adds under a new name or an unknown field
is still caught when its key looks like one:

* values under credential-like keys (``encryptedKey``, ``jwt``, ``apiSecret``, ``apiKey``,
  ``password``, ``token``, ...) become :data:`MARKER`;
* every value of an HTTP ``headers`` object becomes :data:`MARKER` (``Authorization``,
  ``X-Api-Key`` and friends live there);
* userinfo is removed from URLs in any string (``s3+https://KEY:SECRET@host/b`` becomes
  ``s3+https://host/b``).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MARKER", "redact", "redact_text"]

MARKER = "[redacted]"

_SECRET_KEYS = frozenset(
    k.lower()
    for k in (
        "encryptedKey",
        "jwt",
        "apiSecret",
        "apiKey",
        "secret",
        "secretKey",
        "secretAccessKey",
        "accessKey",
        "accessKeyId",
        "password",
        "passwd",
        "token",
        "accessToken",
        "refreshToken",
        "authorization",
        "privateKey",
        "credentials",
        "signingKey",
        "clientSecret",
        "sessionToken",
    )
)
_HEADER_KEYS = frozenset({"headers"})
# scheme://userinfo@ ; userinfo stops at the first '/', '?', '#' or whitespace.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s]+)@")


def redact_text(text: str) -> str:
    """Remove URL userinfo from a string (cheap when there is none)."""
    if "@" not in text or "://" not in text:
        return text
    return _USERINFO.sub(r"\g<scheme>", text)


def redact(value: Any) -> Any:
    """A copy of a JSON value with credentials hidden; the input is not modified."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            lowered = key.lower() if isinstance(key, str) else key
            if lowered in _SECRET_KEYS and item is not None:
                out[key] = MARKER
            elif lowered in _HEADER_KEYS and isinstance(item, dict):
                out[key] = dict.fromkeys(item, MARKER)
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
