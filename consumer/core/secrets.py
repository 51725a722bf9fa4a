"""Hide the credentials a task can carry (spec §1) before it leaves phasewatch. Pure.

The store keeps tasks exactly as received (a faithful fold, replayable history). Every
exit (the API, the CLI, logs, handler notifications, the changes feed and the dashboard
when they exist) goes through :func:`redact` or :func:`redact_text` first. Redaction is
by rule, anywhere in the document, not by a list of the fields Livepeer documents today,
so a credential under a new name, in another spelling or inside free text is caught too:

* **Keys.** A key is normalised (lower case, without ``_``, ``-``, ``.`` and spaces), so
  ``api_key``, ``API-KEY`` and ``apiKey`` are one name. Its value becomes :data:`MARKER`
  when the name contains a credential fragment: secret, token, password, passwd, pwd,
  passphrase, auth (not "author"), credential, signature, cookie, session, jwt, bearer;
  or names a key (ends with "key", or contains apikey, accesskey, privatekey, ...).
* **Headers.** Every value under a ``headers`` key is hidden, whatever its shape: an
  object, a list of ``"Name: value"`` strings, of ``[name, value]`` pairs or of
  ``{"name", "value"}`` objects, or a string.
* **Strings** (:func:`redact_text`), wherever they are:

  - URL userinfo is cut up to the last ``@`` before the host, so a secret holding ``/``
    or ``@`` goes too (``s3+https://KEY:SE/CR@ET@host/b`` becomes ``s3+https://host/b``);
  - signature-like query parameters (``X-Amz-Signature``, CloudFront's ``Signature``,
    ``Policy`` and ``Key-Pair-Id``, ``sig``, ``token=``, ``jwt=``, and any parameter
    whose name the key rule matches) keep their name and lose their value;
  - ``Bearer ...``, ``Basic ...`` and ``name=value`` / ``name: value`` pairs whose name
    the key rule matches (``AccountKey=...;`` in a connection string, ``password=...``
    in an error message) keep the name and lose the value.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

__all__ = ["MARKER", "describe_error", "is_secret_name", "redact", "redact_text"]

MARKER = "[redacted]"

_FRAGMENTS = (
    "secret",
    "token",
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "credential",
    "signature",
    "cookie",
    "session",
    "jwt",
    "bearer",
    "apikey",
    "accesskey",
    "privatekey",
    "secretkey",
    "signingkey",
    "encryptionkey",
    "accountkey",
    "masterkey",
    "sharedkey",
)
# Query parameters that carry a signature or grant without a credential-like name.
_SIGNING_PARAMS = frozenset({"sig", "policy", "keypairid", "xgoogcredential"})
_HEADER_KEYS = frozenset({"headers", "header", "httpheaders"})
_NORMALISE = str.maketrans("", "", "_-. ")


@lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """Whether a key or parameter named ``name`` holds a credential (the key rule)."""
    norm = name.lower().translate(_NORMALISE)
    if not norm:
        return False
    if norm.endswith("key") or any(f in norm for f in _FRAGMENTS):
        return True
    # "auth", "oauth", "authorization", "x-auth-token"; not "author" or "authors".
    return "auth" in norm and ("author" not in norm or "authoriz" in norm)


def _is_signing_param(name: str) -> bool:
    return is_secret_name(name) or name.lower().translate(_NORMALISE) in _SIGNING_PARAMS


# scheme://<non-space run>: the URL, up to whitespace or a quote or bracket around it.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s\"'<>\[\]{}]+)")
_HOST_AFTER = re.compile(r"[A-Za-z0-9._~%\-]+(?::\d+)?(?:[/?#]|$)")
# "Bearer abc", "Basic dXNlcjpwdw==": the scheme word stays, the credential goes.
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic|token|digest)(\s+)[A-Za-z0-9._~+/=\-]{4,}")
# name=value or name: value, the name optionally quoted (JSON in an error message).
_PAIR = re.compile(
    r"""(?P<name>[A-Za-z][\w.\-]*)(?P<sep>["']?\s*[=:]\s*["']?)"""
    r"""(?P<value>[^\s&;,"'<>()\[\]{}=:]+=*)(?=[\s&;,"'<>()\[\]{}]|$)"""
)
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#;\s]+)=(?P<value>[^&#;\s]*)")


def _userinfo_end(rest: str) -> int:
    """Where the host starts in ``rest`` (the URL after ``scheme://``): 0 if there is no
    userinfo, else one past the last ``@`` before the host."""
    cut = len(rest)
    for stop in "/?#":
        at = rest.find(stop)
        if at != -1:
            cut = min(cut, at)
    head = rest[:cut]
    _user, colon, after = head.partition(":")
    # A ':' not followed by a port says userinfo ("user:pa/ss@host": the password holds
    # a '/', as AWS secret keys often do, so the authority only seemed to end early).
    if "@" not in head and (not colon or after.isdigit()):
        return 0
    # The host follows the last '@' of the URL before its query or fragment: a secret may
    # hold '/' and '@', rarely '?' or '#', while a query may well hold an e-mail address.
    region = len(rest)
    for stop in "?#":
        at = rest.find(stop, cut)
        if at != -1:
            region = min(region, at)
    at = region
    while (at := rest.rfind("@", 0, at)) != -1:
        if _HOST_AFTER.match(rest, at + 1):
            return at + 1
    return 0


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match["scheme"], match["rest"]
    rest = rest[_userinfo_end(rest) :]
    if "=" in rest:
        rest = _QUERY_PARAM.sub(_redact_param, rest)
    return scheme + rest


def _redact_param(match: re.Match[str]) -> str:
    if not _is_signing_param(match["name"]) or not match["value"]:
        return match[0]
    return f"{match['lead']}{match['name']}={MARKER}"


def _redact_pair(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]) or match["value"] == MARKER:
        return match[0]
    return f"{match['name']}{match['sep']}{MARKER}"


def redact_text(text: str) -> str:
    """Hide credentials inside free text (cheap when there is nothing to look at)."""
    if "://" in text:
        text = _URL.sub(_redact_url, text)
    if " " in text:
        text = _AUTH_SCHEME.sub(lambda m: f"{m[1]}{m[2]}{MARKER}", text)
    if "=" in text or ":" in text:
        text = _PAIR.sub(_redact_pair, text)
    return text


def describe_error(exc: BaseException, limit: int = 500) -> str:
    """An error as logs, /readyz and dead letters show it: its type and message, with
    credentials cut out (a handler or a driver may put a URL with userinfo in it)."""
    text = str(exc) or type(exc).__name__
    return redact_text(f"{type(exc).__name__}: {text}")[:limit]


def redact(value: Any) -> Any:
    """A copy of a JSON value with credentials hidden; the input is not modified."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                out[key] = redact(item)
            elif key.lower() in _HEADER_KEYS:
                out[key] = _redact_headers(item)
            elif item is not None and is_secret_name(key):
                out[key] = MARKER
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _redact_headers(headers: Any) -> Any:
    """Every header value hidden; names kept where the shape says which part is one."""
    if isinstance(headers, dict):
        return dict.fromkeys(headers, MARKER)
    if isinstance(headers, str):
        return MARKER
    if not isinstance(headers, list):
        return redact(headers)
    out: list[Any] = []
    for item in headers:
        if isinstance(item, str):
            name, colon, _ = item.partition(":")
            out.append(f"{name}: {MARKER}" if colon else MARKER)
        elif isinstance(item, list) and item:
            name = item[0] if isinstance(item[0], str) else MARKER
            out.append([name] + [MARKER] * (len(item) - 1))
        elif isinstance(item, dict):
            out.append(
                {
                    k: (v if k.lower() in ("name", "key") and isinstance(v, str) else MARKER)
                    for k, v in item.items()
                }
            )
        else:
            out.append(MARKER)
    return out
