"""from_settings: which built-ins the settings switch on, and clear errors when incomplete."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import SecretStr

from consumer import Settings
from handlers import from_settings


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings also read PHASEWATCH_* variables: the machine's must not leak in.
    for name in list(os.environ):
        if name.startswith("PHASEWATCH_"):
            monkeypatch.delenv(name)


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def test_nothing_enabled_by_default() -> None:
    assert from_settings(_settings()) == []


def test_all_three() -> None:
    subs = from_settings(
        _settings(
            notify_url="https://ops:pw@hooks.example/phasewatch?token=t",
            notify_secret=SecretStr("whsec_c2VjcmV0"),
            notify_phases=" completed, failed ,,",
            notify_timeout_s=4,
            publish_topic="phasewatch.changes",
            kafka_bootstrap_servers="127.0.0.1:9",
            log_changes=True,
            dispatch_max_attempts=5,
            dispatch_concurrency=3,
        )
    )
    notify, publish, log = subs
    assert [s.name for s in subs] == ["http-notify", "kafka-publish", "log"]
    assert notify.phases == {"completed", "failed"}
    assert notify.timeout_s > 4
    assert notify.extra["target"] == "https://hooks.example/phasewatch"
    assert (notify.max_attempts, notify.concurrency) == (5, 3)
    assert publish.extra["topic"] == "phasewatch.changes"
    assert publish.phases == frozenset()
    assert (publish.max_attempts, publish.concurrency) == (5, 3)
    for sub in subs:
        assert sub.on_start is None or sub.on_stop is not None
    assert log.on_start is None


def test_empty_notify_phases_means_every_phase() -> None:
    [notify] = from_settings(
        _settings(notify_url="https://hooks.example/x", notify_secret=SecretStr("s"))
    )
    assert notify.phases == frozenset()


@pytest.mark.parametrize("secret", [None, ""])
def test_notify_url_needs_a_secret(secret: str | None) -> None:
    settings = _settings(
        notify_url="https://ops:pw@hooks.example/x",
        notify_secret=None if secret is None else SecretStr(secret),
    )
    with pytest.raises(ValueError, match="PHASEWATCH_NOTIFY_SECRET") as caught:
        from_settings(settings)
    assert "pw" not in str(caught.value)


def test_publish_topic_needs_brokers() -> None:
    with pytest.raises(ValueError, match="PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS"):
        from_settings(_settings(publish_topic="phasewatch.changes"))
