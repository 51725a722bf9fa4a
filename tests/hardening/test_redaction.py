"""Credentials are hidden by rule at every exit: the shapes the hostile campaign found
leaking, and a property over secrets planted anywhere under credential-like names."""

from __future__ import annotations

import string
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.core.change import PhaseChange
from consumer.core.model import Task
from consumer.core.secrets import MARKER, is_secret_name, redact, redact_text
from handlers.log import log_changes
from tests.support import snapshot

SECRET = "s3cr3tVALUE"  # planted; must never be seen again


def shows(value: Any) -> bool:
    return SECRET in orjson.dumps(value).decode()


@pytest.mark.parametrize(
    "text",
    [
        # URL userinfo whose secret holds '/' or '@' (AWS secret keys often hold '/').
        f"s3+https://AKIA:{SECRET}/x+y@bucket.s3.amazonaws.com/key",
        f"s3+https://AKIA:a@{SECRET}/c@host/bucket",
        f"https://user:{SECRET}@host:8443/path",
        # Signatures and grants in query strings: S3 presigned, CloudFront, token=, jwt=.
        f"https://b.s3.amazonaws.com/o?X-Amz-Credential=AKIA%2F1&X-Amz-Signature={SECRET}",
        f"https://b.s3.amazonaws.com/o?X-Amz-Security-Token={SECRET}&X-Amz-Expires=60",
        f"https://d1.cloudfront.net/v.mp4?Expires=1&Signature={SECRET}&Key-Pair-Id=K",
        f"https://cdn.example/v.m3u8?token={SECRET}",
        f"https://cdn.example/v.m3u8?a=1&jwt={SECRET}",
        # Free text: bearer credentials, connection strings, error messages.
        f"upload failed: Authorization: Bearer {SECRET} (403)",
        f"DefaultEndpointsProtocol=https;AccountName=a;AccountKey={SECRET};EndpointSuffix=x",
        f"connect failed: password={SECRET} host=db",
        f'error {{"client_secret": "{SECRET}"}}',
    ],
)
def test_free_text_loses_the_credential(text: str) -> None:
    hidden = redact_text(text)
    assert SECRET not in hidden
    assert MARKER in hidden or "://" in hidden


@pytest.mark.parametrize(
    "name",
    [
        "api_key",
        "client_secret",
        "aws_secret_access_key",
        "access_token",
        "passphrase",
        "privateKeyPem",
        "encrypted_key",
        "X-Api-Key",
        "sessionToken",
        "Cookie",
        "refresh-token",
        "oauth",
    ],
)
def test_credential_names_in_any_spelling(name: str) -> None:
    assert is_secret_name(name)
    assert not shows(redact({"params": {"x": {name: SECRET}}}))


@pytest.mark.parametrize(
    "name", ["id", "userId", "inputAssetId", "phase", "updatedAt", "author", "keyframes", "type"]
)
def test_ordinary_task_fields_are_not_taken_for_credentials(name: str) -> None:
    assert not is_secret_name(name)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": SECRET},
        [f"Authorization: Bearer {SECRET}"],
        [["X-Token", SECRET]],
        [{"name": "X-Token", "value": SECRET}],
        f"Authorization: {SECRET}",
    ],
)
def test_headers_are_hidden_whatever_their_shape(headers: Any) -> None:
    assert not shows(redact({"export": {"custom": {"url": "https://h/x", "headers": headers}}}))


def test_ordinary_urls_and_text_are_left_alone() -> None:
    for text in [
        "https://cdn.example/a@b",
        "https://host/p?email=a@b.com&page=2",
        "https://cdn.example:8080/v.mp4",
        "status: running, progress: 0.5",
        "2025-06-15T15:06:40Z",
    ]:
        assert redact_text(text) == text


def test_a_snake_case_alias_cannot_reach_the_secret_through_the_model() -> None:
    """A handler reading ``encryption.encrypted_key`` used to get the real secret."""
    task = snapshot("T", "completed", 1)
    task["params"] = {"upload": {"encryption": {"encrypted_key": SECRET, "encryptedKey": SECRET}}}
    change = PhaseChange.example(task, phase="completed")
    assert not shows(change.task.wire())
    assert not shows(change.summary())


# ---------------------------------------------------------------- the property

_FRAGMENTS = ["secret", "token", "password", "apiKey", "auth", "credential", "signature"]
_names = st.builds(
    lambda prefix, fragment, suffix, style: style(prefix + fragment + suffix),
    st.sampled_from(["", "client", "aws", "x", "my", "refresh", "private"]),
    st.sampled_from(_FRAGMENTS),
    st.sampled_from(["", "Value", "Id", "2", "_key"]),
    st.sampled_from([str, str.lower, str.upper, lambda s: s.replace("e", "_e")]),
)
_plain_keys = st.text(string.ascii_lowercase, min_size=1, max_size=6).filter(
    lambda k: not is_secret_name(k)
)
_json_leaf = st.one_of(st.integers(-5, 5), st.booleans(), st.none(), st.sampled_from(["a", "b"]))
_documents = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_plain_keys, inner, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def planted(draw: st.DrawFn) -> dict[str, Any]:
    """A task whose params hold random JSON with the secret planted at random paths,
    under credential-like names in random spellings, or as a URL or text carrying it."""
    params: dict[str, Any] = {}
    for _ in range(draw(st.integers(1, 4))):
        node = params
        for key in draw(st.lists(_plain_keys, max_size=3)):
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else node
        how = draw(st.sampled_from(["key", "url", "query", "bearer", "pair"]))
        if how == "key":
            node[draw(_names)] = SECRET
        elif how == "url":
            node[draw(_plain_keys)] = f"https://u:{SECRET}@host/p"
        elif how == "query":
            node[draw(_plain_keys)] = f"https://host/p?{draw(_names)}={SECRET}&n=1"
        elif how == "bearer":
            node[draw(_plain_keys)] = f"failed: Authorization: Bearer {SECRET}"
        else:
            node[draw(_plain_keys)] = f"{draw(_names)}={SECRET};other=1"
        node[draw(_plain_keys)] = draw(_documents)
    task = snapshot("T", "failed", 1)
    task["params"] = params
    task["status"]["errorMessage"] = f"token={SECRET}"
    return task


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(planted())
def test_no_exit_shows_a_planted_secret(task: dict[str, Any]) -> None:
    assert shows(task)  # planted indeed
    assert not shows(redact(task))  # the API, the CLI, the history
    change = PhaseChange.example(task, phase="failed", previous_phase="running")
    assert not shows(change.task.wire())  # what a handler receives
    assert not shows(change.summary())  # notifier bodies and Kafka publications
    assert not shows(Task.model_validate(redact(task)).wire())


async def test_the_log_handler_shows_no_planted_secret(capsys: pytest.CaptureFixture[str]) -> None:
    task = snapshot("T", "failed", 1)
    task["params"] = {"export": {"url": f"https://u:{SECRET}@h/x?sig={SECRET}"}}
    task["status"]["errorMessage"] = f"Bearer {SECRET}"
    sub = log_changes()
    await sub(PhaseChange.example(task, phase="failed", previous_phase="running"))
    line = capsys.readouterr().out
    assert '"taskId":"T"' in line and SECRET not in line
