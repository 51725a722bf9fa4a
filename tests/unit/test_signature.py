"""Livepeer-Signature verification on raw bytes."""

from __future__ import annotations

import pytest

from consumer.core.signature import SignatureError, sign, verify
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
