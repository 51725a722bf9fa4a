"""Receipts: their stored form (compact, tolerant of what later versions add) and the W3C
``traceparent`` check the webhook receiver copies a header through."""

from __future__ import annotations

import pytest

from consumer.core.codec import decode
from consumer.core.plan import plan_batch
from consumer.core.receipt import Receipt, valid_traceparent
from tests.support import snapshot, webhook_body

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "receipt",
    [Receipt("0"), Receipt(traceparent=TRACE), Receipt("prod", TRACE), Receipt("é ✓", None)],
)
def test_a_receipt_reads_back_as_it_was_encoded(receipt: Receipt) -> None:
    text = receipt.encode()
    assert text is not None and " " not in text.replace("é ✓", "")  # compact
    assert Receipt.decode(text) == receipt
    assert Receipt.decode(text.encode()) == receipt


def test_the_encoding_names_only_the_fields_that_are_set() -> None:
    assert Receipt("a").encode() == '{"secret":"a"}'
    assert Receipt(traceparent=TRACE).encode() == f'{{"traceparent":"{TRACE}"}}'


def test_an_empty_receipt_is_stored_as_nothing() -> None:
    assert Receipt().encode() is None
    assert Receipt.decode(None) is None and Receipt.decode("") is None
    assert Receipt.decode("{}") is None


def test_decoding_ignores_unknown_keys_and_misshapen_values() -> None:
    # A later version may add fields: an older one reads the ones it knows.
    assert Receipt.decode('{"secret":"1","via":"proxy","hops":[1,2]}') == Receipt("1")
    assert Receipt.decode('{"secret":7,"traceparent":"x"}') == Receipt(traceparent="x")
    for garbage in ("not json", "[1, 2]", '"text"', "null", b"\xff\xfe"):
        assert Receipt.decode(garbage) is None


def test_a_receipt_never_changes_the_fold() -> None:
    raw = webhook_body("e1", snapshot("T", "running", 5))
    plain, with_receipt = decode(raw), decode(raw)
    with_receipt.receipt = Receipt("prod", TRACE)
    a = plan_batch([plain], (), {})
    b = plan_batch([with_receipt], (), {})
    assert a.states == b.states and a.outcomes == b.outcomes
    assert [c.traceparent for c in a.changes] == [None]
    assert [c.traceparent for c in b.changes] == [TRACE]
    record = b.changes[0].recorded(1, 10)
    assert record.traceparent == TRACE


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        (TRACE, TRACE),
        (f"  {TRACE}\t", TRACE),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", "same"),
        # A later version: its first four fields, kept as version 00 would send them.
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra-fields",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        (
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
        ),
    ],
)
def test_valid_traceparents_are_kept(header: str, kept: str) -> None:
    assert valid_traceparent(header) == (header if kept == "same" else kept)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # uppercase
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
        f"{TRACE}-extra",  # version 00 has exactly four fields
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",  # short flags
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",  # no '-' after flags
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
    ],
)
def test_invalid_traceparents_are_dropped(header: str | None) -> None:
    assert valid_traceparent(header) is None
