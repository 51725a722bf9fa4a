"""Livepeer-Signature verification on raw bytes."""

from __future__ import annotations

import hmac
import re

import pytest

from consumer.core.signature import (
    SignatureError,
    WebhookSecret,
    parse_secrets,
    sign,
    verify,
    verify_any,
)
from tests.support import FIXTURE_SECRET, deliveries

NOW = 1_750_000_000_000


def test_every_fixture_delivery_verifies() -> None:
    for d in deliveries("small"):
        t = verify(d.signature, d.body, FIXTURE_SECRET, now_ms=NOW, tolerance_ms=0)
        assert t == d.doc["timestamp"]


def test_signature_covers_the_raw_bytes() -> None:
    body = b'{"id":"e","event":"task.updated"}'
    header = sign(b"k", body, NOW)
    verify(header, body, b"k", now_ms=NOW, tolerance_ms=1000)
    # Re-serialising the same JSON with other whitespace is a different body.
    with pytest.raises(SignatureError, match="does not match"):
        verify(header, b'{"id": "e", "event": "task.updated"}', b"k", now_ms=NOW, tolerance_ms=1000)


def test_any_of_several_v1_values_may_match() -> None:
    body = b"{}"
    good = sign(b"new", body, NOW).split(",")[1]
    verify(f"t={NOW},v1={'0' * 64},{good}", body, b"new", now_ms=NOW, tolerance_ms=0)


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "missing"),
        ("", "missing"),
        ("garbage", "malformed"),
        ("t=abc,v1=00", "malformed"),
        ("v1=00", "malformed"),
        (f"t={NOW}", "malformed"),
        (f"t={NOW},v1=deadbeef", "does not match"),
    ],
)
def test_bad_headers(header: str | None, says: str) -> None:
    with pytest.raises(SignatureError, match=says):
        verify(header, b"{}", b"k", now_ms=NOW, tolerance_ms=0)


def test_wrong_secret() -> None:
    with pytest.raises(SignatureError):
        verify(sign(b"a", b"{}", NOW), b"{}", b"b", now_ms=NOW, tolerance_ms=0)


def test_freshness_window() -> None:
    header = sign(b"k", b"{}", NOW - 301_000)
    with pytest.raises(SignatureError, match="window"):
        verify(header, b"{}", b"k", now_ms=NOW, tolerance_ms=300_000)
    verify(header, b"{}", b"k", now_ms=NOW, tolerance_ms=0)  # 0 disables the window
    future = sign(b"k", b"{}", NOW + 301_000)
    with pytest.raises(SignatureError, match="window"):
        verify(future, b"{}", b"k", now_ms=NOW, tolerance_ms=300_000)


@pytest.mark.parametrize(
    "header",
    [f"t={NOW},v1=\u00e9\u00e9", f"t={NOW},v1=\udcff", f"t=\u00b2{NOW}", "t=\u0663,v1=00"],
)
def test_non_ascii_header_values_are_refused_not_crashed_on(header: str) -> None:
    with pytest.raises(SignatureError):
        verify(header, b"{}", b"k", now_ms=NOW, tolerance_ms=0)


# -- several secrets (PHASEWATCH_WEBHOOK_SECRET lists)


def test_a_list_of_secrets_is_named_by_index_or_by_name() -> None:
    assert parse_secrets("a") == (WebhookSecret("0", b"a"),)
    assert parse_secrets(" a , prod=b,c ") == (
        WebhookSecret("0", b"a"),
        WebhookSecret("prod", b"b"),
        WebhookSecret("2", b"c"),
    )
    assert parse_secrets(b"old = x, new.v2 = y") == (
        WebhookSecret("old", b"x"),
        WebhookSecret("new.v2", b"y"),
    )


@pytest.mark.parametrize(
    ("item", "name", "key"),
    [
        ("c2VjcmV0IQ==", "0", b"c2VjcmV0IQ=="),  # base64 padding: not a name
        ("YWJjZA=", "0", b"YWJjZA="),
        ("=leading", "0", b"=leading"),
        ("1abc=def", "0", b"1abc=def"),  # a name starts with a letter
        ("a/b=c", "0", b"a/b=c"),
        ("p=se=cret", "p", b"se=cret"),  # after the first '=', all is the secret
        ("whsec_fixture", "0", b"whsec_fixture"),
    ],
)
def test_what_counts_as_a_name(item: str, name: str, key: bytes) -> None:
    assert parse_secrets(item) == (WebhookSecret(name, key),)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "is empty"),
        ("  ", "is empty"),
        ("a,,b", "index 1 (0-based) of 3 is empty"),
        ("a,", "index 1 (0-based) of 2 is empty"),
        (",a", "index 0 (0-based) of 2 is empty"),
        ("a, ,b", "index 1"),
        ("x=s3cret-one,x=s3cret-two", "name 'x' is given to two secrets"),
        ("s3cret-one,p=s3cret-one", "indexes 0 and 1 are the same secret"),
    ],
)
def test_bad_lists_are_refused_without_quoting_a_secret(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as raised:
        parse_secrets(value)
    assert "s3cret" not in str(raised.value)


def test_a_secret_is_never_in_its_repr() -> None:
    assert "hunter2" not in repr(parse_secrets("hunter2,p=hunter3"))


SECRETS = parse_secrets("first,second=two,third")


@pytest.mark.parametrize("which", [0, 1, 2])
def test_any_listed_secret_verifies_and_is_named(which: int) -> None:
    header = sign(SECRETS[which].key, b"{}", NOW)
    timestamp, secret = verify_any(header, b"{}", SECRETS, now_ms=NOW, tolerance_ms=0)
    assert timestamp == NOW and secret == SECRETS[which]
    assert secret.name == ["0", "second", "2"][which]


def test_an_unlisted_secret_does_not_verify() -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify_any(sign(b"other", b"{}", NOW), b"{}", SECRETS, now_ms=NOW, tolerance_ms=0)
    with pytest.raises(ValueError, match="no secret"):
        verify_any(sign(b"other", b"{}", NOW), b"{}", (), now_ms=NOW, tolerance_ms=0)


@pytest.mark.parametrize("signed_with", ["first", "two", "third", "nobody"])
@pytest.mark.parametrize("values", [1, 3])
def test_every_secret_is_compared_with_every_value_whatever_matches(
    monkeypatch: pytest.MonkeyPatch, signed_with: str, values: int
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    good = sign(signed_with.encode(), b"{}", NOW).split(",")[1]
    header = ",".join([f"t={NOW}", *[f"v1={'0' * 64}"] * (values - 1), good])
    if signed_with == "nobody":
        with pytest.raises(SignatureError):
            verify_any(header, b"{}", SECRETS, now_ms=NOW, tolerance_ms=0)
    else:
        _, secret = verify_any(header, b"{}", SECRETS, now_ms=NOW, tolerance_ms=0)
        assert secret.key == signed_with.encode()
    # No early return: each secret's HMAC met each v1 value, in every case.
    assert len(calls) == len(SECRETS) * values
    assert len({a for a, _ in calls}) == len(SECRETS)
