"""http_notify against a real HTTP receiver: signing, ids across retries, how each
response is judged, and that no credential leaves (spec §1)."""

from __future__ import annotations

import base64
import dataclasses
import logging
import time

import orjson
import pytest

from consumer import PermanentError, Subscription
from handlers import InvalidNotification, NotifyError, http_notify, verify_notification
from handlers.signing import sign, signing_key
from tests.handlers.conftest import Answer, Receiver
from tests.handlers.support import assert_no_credentials, make_change

SECRET = "whsec_" + base64.b64encode(b"phasewatch-test-key-0123456789ab").decode()


async def _started(sub: Subscription) -> Subscription:
    assert sub.on_start is not None
    await sub.on_start()
    return sub


async def _stop(sub: Subscription) -> None:
    assert sub.on_stop is not None
    await sub.on_stop()


async def test_posts_the_signed_summary(receiver: Receiver) -> None:
    sub = await _started(http_notify(receiver.url(), SECRET))
    change = make_change(seq=7)
    try:
        before = int(time.time())
        await sub.fn(change)
    finally:
        await _stop(sub)
    [request] = receiver.received
    assert (request.method, request.path) == ("POST", "/hook")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "phasewatch"
    # The change's idempotency key, three times: webhook-id, Idempotency-Key (a
    # Structured Fields string, quoted) and the body.
    assert request.headers["webhook-id"] == change.idempotency_key
    assert request.headers["idempotency-key"] == f'"{change.idempotency_key}"'
    assert orjson.loads(request.body)["idempotencyKey"] == change.idempotency_key
    assert request.headers["webhook-attempt"] == "1"
    assert before <= int(request.headers["webhook-timestamp"]) <= int(time.time())
    assert request.headers["webhook-signature"].startswith("v1,")
    assert orjson.loads(request.body) == change.summary()
    assert verify_notification(SECRET, request.headers, request.body) == change.summary()


async def test_body_and_headers_carry_no_credential(receiver: Receiver) -> None:
    sub = await _started(http_notify(receiver.url(), SECRET))
    try:
        await sub.fn(make_change())
    finally:
        await _stop(sub)
    [request] = receiver.received
    assert_no_credentials(request.body)
    assert_no_credentials(orjson.dumps(request.headers))
    sent = orjson.loads(request.body)
    # Userinfo is cut out of free text, the rest of the message kept.
    assert sent["task"]["errorMessage"] == "upload to s3+https://storage.example/bucket failed: 403"
    assert "params" not in sent["task"]


async def test_signature_fails_when_tampered_stale_or_wrong_secret(receiver: Receiver) -> None:
    sub = await _started(http_notify(receiver.url(), SECRET))
    try:
        await sub.fn(make_change())
    finally:
        await _stop(sub)
    [request] = receiver.received
    headers, body = request.headers, request.body
    stamp = int(headers["webhook-timestamp"])
    verify_notification(SECRET, headers, body, now=stamp + 299)

    with pytest.raises(InvalidNotification, match="no webhook-signature matches"):
        verify_notification(SECRET, headers, body.replace(b'"failed"', b'"completed"'))
    other_id = make_change(seq=8, event_id="evt-8").idempotency_key
    with pytest.raises(InvalidNotification, match="no webhook-signature matches"):
        verify_notification(SECRET, {**headers, "webhook-id": other_id}, body)
    with pytest.raises(InvalidNotification, match="no webhook-signature matches"):
        # A re-signed timestamp needs the key: moving it breaks the signature.
        verify_notification(SECRET, {**headers, "webhook-timestamp": str(stamp + 1)}, body)
    with pytest.raises(InvalidNotification, match="outside the 300 s window"):
        verify_notification(SECRET, headers, body, now=stamp + 301)
    with pytest.raises(InvalidNotification, match="outside the 300 s window"):
        verify_notification(SECRET, headers, body, now=stamp - 301)
    # tolerance 0: an archived delivery still verifies.
    verify_notification(SECRET, headers, body, now=stamp + 10**6, tolerance_s=0)
    other = "whsec_" + base64.b64encode(b"another-key-another-key-another!").decode()
    with pytest.raises(InvalidNotification, match="no webhook-signature matches"):
        verify_notification(other, headers, body)
    with pytest.raises(InvalidNotification, match="missing"):
        verify_notification(SECRET, {k: v for k, v in headers.items() if k != "webhook-id"}, body)
    with pytest.raises(InvalidNotification, match="not a number"):
        verify_notification(SECRET, {**headers, "webhook-timestamp": "soon"}, body)
    assert issubclass(InvalidNotification, ValueError)


def test_verify_matches_the_standard_webhooks_vector() -> None:
    # Published by the Standard Webhooks specification: receivers can use its libraries.
    headers = {
        "Webhook-Id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "Webhook-Timestamp": "1614265330",
        "Webhook-Signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"test": 2432232314}'
    assert verify_notification(secret, headers, body, now=1614265330) == {"test": 2432232314}
    # Several signatures (a rotation), other versions ignored: one match is enough.
    rotated = {
        **headers,
        "Webhook-Signature": "v1a,c29tZXRoaW5n v1,AAAA " + headers["Webhook-Signature"],
    }
    assert verify_notification(secret, rotated, body, now=1614265330) == {"test": 2432232314}
    only_bad = {**headers, "Webhook-Signature": "v1,AAAA v1a,c29tZXRoaW5n"}
    with pytest.raises(InvalidNotification):
        verify_notification(secret, only_bad, body, now=1614265330)
    key = signing_key(secret)
    for raw, error in ((b"not json", "not JSON"), (b"[1, 2]", "not a JSON object")):
        signed = {
            "webhook-id": "m",
            "webhook-timestamp": "1614265330",
            "webhook-signature": sign(key, "m", 1614265330, raw),
        }
        with pytest.raises(InvalidNotification, match=error):
            verify_notification(secret, signed, raw, now=1614265330)


async def test_plain_secret_is_used_as_utf8_bytes(receiver: Receiver) -> None:
    sub = await _started(http_notify(receiver.url(), "plain shared secret"))
    try:
        await sub.fn(make_change())
    finally:
        await _stop(sub)
    [request] = receiver.received
    verify_notification("plain shared secret", request.headers, request.body)
    verify_notification(b"plain shared secret", request.headers, request.body)
    # The same key in Standard Webhooks form.
    as_whsec = "whsec_" + base64.b64encode(b"plain shared secret").decode()
    verify_notification(as_whsec, request.headers, request.body)
    with pytest.raises(InvalidNotification):
        verify_notification("plain shared secreT", request.headers, request.body)


async def test_webhook_id_is_stable_across_retries(receiver: Receiver) -> None:
    receiver.answer(Answer(500, "busy"), Answer(200))
    sub = await _started(http_notify(receiver.url(), SECRET, name="notify-a"))
    change = make_change(seq=41, handler="notify-a")
    # The same change re-read from a store rebuilt from an export: another seq.
    reread = make_change(seq=9041, event_id=change.event_id, handler="notify-a")
    try:
        with pytest.raises(NotifyError):
            await sub.fn(change)
        # The dispatcher's retry: the same change, one attempt later.
        await sub.fn(dataclasses.replace(change, attempt=2))
        await sub.fn(reread)
        await sub.fn(make_change(seq=42, handler="notify-a"))
        await sub.fn(make_change(seq=41, handler="notify-a", replay_run="run-1"))
        await sub.fn(make_change(seq=41, handler="notify-a", replay_run="run-2"))
        await sub.fn(make_change(seq=41, handler="notify-b"))
    finally:
        await _stop(sub)
    first, retry, again, other, replay_1, replay_2, other_handler = receiver.received
    key = change.idempotency_key
    for request in (first, retry, again):
        assert request.headers["webhook-id"] == key
        assert request.headers["idempotency-key"] == f'"{key}"'
        assert orjson.loads(request.body)["idempotencyKey"] == key
    assert (first.headers["webhook-attempt"], retry.headers["webhook-attempt"]) == ("1", "2")
    assert first.body == retry.body
    # Another change, each replay run, another handler: keys of their own.
    ids = [r.headers["webhook-id"] for r in (first, other, replay_1, replay_2, other_handler)]
    assert len(set(ids)) == 5
    for request in receiver.received:
        assert request.headers["idempotency-key"] == f'"{request.headers["webhook-id"]}"'
        assert orjson.loads(request.body)["idempotencyKey"] == request.headers["webhook-id"]
        verify_notification(SECRET, request.headers, request.body)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
async def test_4xx_is_permanent(receiver: Receiver, status: int) -> None:
    receiver.answer(Answer(status, "  no such\n  endpoint  "))
    sub = await _started(http_notify(receiver.url(), SECRET))
    try:
        with pytest.raises(PermanentError) as caught:
            await sub.fn(make_change())
    finally:
        await _stop(sub)
    message = str(caught.value)
    assert f": {status} " in message
    assert message.endswith(": no such endpoint")
    change = make_change()
    assert f"http-notify: POST change 7 ({change.idempotency_key})" in message


async def test_redirect_is_permanent_and_not_followed(receiver: Receiver) -> None:
    receiver.answer(Answer(307, "", {"Location": receiver.url("/elsewhere")}))
    sub = await _started(http_notify(receiver.url(), SECRET))
    try:
        with pytest.raises(PermanentError, match=r"307.*redirect to .*/elsewhere not followed"):
            await sub.fn(make_change())
    finally:
        await _stop(sub)
    assert [r.path for r in receiver.received] == ["/hook"]


@pytest.mark.parametrize(
    ("status", "headers", "hint"),
    [
        (500, {}, "500 Internal Server Error"),
        (502, {}, "502 Bad Gateway"),
        (503, {"Retry-After": "30"}, "Retry-After: 30"),
        (408, {}, "408 Request Timeout"),
        (429, {"Retry-After": "5"}, "429 Too Many Requests (Retry-After: 5)"),
    ],
)
async def test_5xx_408_429_are_retryable(
    receiver: Receiver, status: int, headers: dict[str, str], hint: str
) -> None:
    receiver.answer(Answer(status, "try later", headers))
    sub = await _started(http_notify(receiver.url(), SECRET))
    try:
        with pytest.raises(NotifyError) as caught:
            await sub.fn(make_change())
    finally:
        await _stop(sub)
    assert not isinstance(caught.value, PermanentError)
    assert hint in str(caught.value)
    assert "try later" in str(caught.value)


async def test_timeout_is_retryable(receiver: Receiver) -> None:
    receiver.answer(Answer(hang=True))
    sub = await _started(http_notify(receiver.url(), SECRET, timeout_s=0.2))
    # The dispatcher's per-call limit leaves room for ours to fire first, with its message.
    assert sub.timeout_s > 0.2
    try:
        # Our own limit fires (its message names it), not the dispatcher's per-call one.
        with pytest.raises(NotifyError, match=r"no response within 0\.2 s"):
            await sub.fn(make_change())
    finally:
        await _stop(sub)
    assert len(receiver.received) == 1


async def test_connection_refused_is_retryable(refused_url: str) -> None:
    sub = await _started(http_notify(refused_url, SECRET))
    try:
        with pytest.raises(NotifyError, match="ClientConnectorError") as caught:
            await sub.fn(make_change())
    finally:
        await _stop(sub)
    assert not isinstance(caught.value, PermanentError)
    assert caught.value.__suppress_context__


async def test_url_credentials_go_to_the_receiver_only(
    receiver: Receiver, refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = receiver.url(userinfo="ops:hunter2", query="token=qs-s3cr3t")
    receiver.answer(Answer(200), Answer(500, "down"), Answer(404, "gone"))
    sub = await _started(http_notify(url, SECRET))
    messages: list[str] = []
    try:
        await sub.fn(make_change())
        for expected in (NotifyError, PermanentError):
            with pytest.raises(expected) as caught:
                await sub.fn(make_change())
            messages.append(str(caught.value))
    finally:
        await _stop(sub)
    refused = await _started(
        http_notify(refused_url.replace("http://", "http://ops:hunter2@"), SECRET)
    )
    try:
        with pytest.raises(NotifyError) as caught:
            await refused.fn(make_change())
        messages.append(str(caught.value))
    finally:
        await _stop(refused)
    # HTTP Basic auth to the configured host is what URL userinfo means...
    expected_auth = "Basic " + base64.b64encode(b"ops:hunter2").decode()
    assert receiver.received[0].headers["authorization"] == expected_auth
    assert receiver.received[0].path == "/hook"
    # ...but it never appears in what phasewatch says about the target.
    shown = [*messages, str(sub.extra), *(r.getMessage() for r in caplog.records)]
    assert len(messages) == 3
    for text in shown:
        assert "hunter2" not in text
        assert "ops:" not in text
        assert "qs-s3cr3t" not in text
    assert sub.extra["target"] == f"http://127.0.0.1:{receiver.port}/hook"


async def test_works_without_on_start_and_stops_cleanly(receiver: Receiver) -> None:
    sub = http_notify(receiver.url(), SECRET)
    await sub.fn(make_change())  # the session is opened on first use
    await _stop(sub)
    await _stop(sub)  # idempotent
    await sub.fn(make_change())  # and reopened after a stop
    await _stop(sub)
    assert len(receiver.received) == 2


def test_filters_and_policy() -> None:
    sub = http_notify(
        "https://example.com/hook",
        SECRET,
        phases=["completed", "failed"],
        types="upload",
        timeout_s=3,
        max_attempts=4,
        name="ops-hook",
    )
    assert sub.name == "ops-hook"
    assert sub.phases == {"completed", "failed"}
    assert sub.types == {"upload"}
    assert sub.updates is False
    assert sub.max_attempts == 4
    assert sub.matches(make_change(phase="failed"))
    assert not sub.matches(make_change(phase="running"))
    assert not sub.matches(make_change(phase="failed", task_type="clip"))
    everything = http_notify("https://example.com/hook", SECRET)
    assert everything.phases == everything.types == frozenset()


@pytest.mark.parametrize(
    ("url", "secret", "error"),
    [
        ("ftp://example.com/hook", SECRET, "http"),
        ("example.com/hook", SECRET, "http"),
        ("http://ops:hunter2@[::1/hook", SECRET, "not a valid URL"),
        ("ftp://ops:hunter2@example.com/hook", SECRET, "http"),
        ("https://example.com/hook", "", "empty"),
        ("https://example.com/hook", "whsec_not*base64!", "not valid base64"),
    ],
)
def test_rejects_bad_configuration(url: str, secret: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as caught:
        http_notify(url, secret)
    assert "base64!" not in str(caught.value)  # never echo the secret...
    assert "hunter2" not in str(caught.value)  # ...nor URL credentials


def test_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        http_notify("https://example.com/hook", SECRET, timeout_s=0)
