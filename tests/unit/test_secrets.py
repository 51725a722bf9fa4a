"""Credentials never leave: redaction by shape, anywhere in a task."""

from __future__ import annotations

import orjson

from consumer.core.secrets import MARKER, redact
from tests.unit.test_model import seed_example

SECRETS = ["secretAccessKey", "accessKeyId", "LS0tLS1CRUdJTiBQUklWQVRF", "eyJhbGciOiJIUzI1NiIs"]


def test_seed_example_loses_every_credential() -> None:
    doc = seed_example()
    hidden = orjson.dumps(redact(doc)).decode()
    for secret in SECRETS:
        assert secret in orjson.dumps(doc).decode()
        assert secret not in hidden
    out = redact(doc)
    assert out["params"]["upload"]["encryption"]["encryptedKey"] == MARKER
    assert out["params"]["transcode-file"]["storage"]["url"] == "s3+https://s3Endpoint/bucket"
    assert out["params"]["exportData"]["ipfs"]["pinata"]["jwt"] == MARKER
    # Everything else is untouched, and the input is not modified.
    assert out["params"]["upload"]["url"] == doc["params"]["upload"]["url"]
    assert doc["params"]["upload"]["encryption"]["encryptedKey"] != MARKER


def test_export_credentials() -> None:
    task = {
        "params": {
            "export": {
                "custom": {
                    "url": "https://user:pw@hook.example/x?y=1",
                    "method": "POST",
                    "headers": {"Authorization": "Bearer abc", "X-Trace": "t"},
                },
                "ipfs": {"pinata": {"apiKey": "k1", "apiSecret": "s1"}},
            }
        }
    }
    out = redact(task)["params"]["export"]
    assert out["custom"]["url"] == "https://hook.example/x?y=1"
    assert out["custom"]["headers"] == {"Authorization": MARKER, "X-Trace": MARKER}
    assert out["ipfs"]["pinata"] == {"apiKey": MARKER, "apiSecret": MARKER}


def test_plain_strings_and_urls_without_userinfo_are_unchanged() -> None:
    for text in ["https://cdn.example/a@b", "user@example.com", "ipfs://bafy", "plain"]:
        assert redact(text) == text
    assert redact("see s3://AK:SK@h/b and ftp://u@h") == "see s3://h/b and ftp://h"
