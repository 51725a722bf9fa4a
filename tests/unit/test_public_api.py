"""The public surfaces, pinned, and what importing them costs: ``import handlers`` loads
no network client nor pydantic-settings; the pure core loads no I/O library. And the
delivery policy: one value whose defaults every way of declaring a handler shares.

Import costs are measured in fresh interpreters: this one has imported everything.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import consumer
import handlers
from consumer import DeliveryPolicy, PhaseChange, Settings
from handlers import http_notify, kafka_publish, log_changes, on

CONSUMER_PUBLIC = {
    "DeliveryPolicy",
    "Handler",
    "KafkaPublisher",
    "PermanentError",
    "Phase",
    "PhaseChange",
    "Settings",
    "Subscription",
    "Task",
    "TaskType",
    "client_options",
    "redact",
}
HANDLERS_PUBLIC = {
    "Handler",
    "InvalidNotification",
    "NotifyError",
    "PermanentError",
    "Phase",
    "PhaseChange",
    "Subscription",
    "Task",
    "TaskType",
    "from_settings",
    "http_notify",
    "kafka_publish",
    "log_changes",
    "on",
    "verify_notification",
}
CORE = Path(consumer.__file__).parent / "core"
IO_LIBRARIES = {"asyncio", "aiohttp", "aiokafka", "sqlite3", "socket", "asyncpg", "psycopg"}


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


def test_consumer_all_is_pinned() -> None:
    assert set(consumer.__all__) == CONSUMER_PUBLIC
    assert len(consumer.__all__) == len(CONSUMER_PUBLIC)
    for name in CONSUMER_PUBLIC:
        assert getattr(consumer, name) is not None


def test_handlers_all_is_pinned() -> None:
    assert set(handlers.__all__) == HANDLERS_PUBLIC
    assert len(handlers.__all__) == len(HANDLERS_PUBLIC)
    assert handlers.Task is consumer.Task


def test_internal_helpers_are_not_exported() -> None:
    for name in ("KafkaConnection", "Event", "DecodeError", "Store"):
        assert name not in consumer.__all__
    with pytest.raises(AttributeError, match="KafkaConnection"):
        _ = consumer.KafkaConnection


def test_import_handlers_loads_no_network_client_nor_settings() -> None:
    loaded = modules_after("import handlers")
    assert loaded & {"aiokafka", "aiohttp", "pydantic_settings"} == set()


def test_lazy_names_resolve_to_their_definitions_whatever_was_imported_first() -> None:
    # A submodule imported first (as handlers.builtin does) must not shadow the function
    # of the same name on the package.
    code = (
        "import handlers.builtin, handlers.http_notify, handlers.kafka_publish\n"
        "from handlers import http_notify, kafka_publish\n"
        "assert callable(http_notify) and callable(kafka_publish)\n"
        "assert http_notify.__module__ == 'handlers.http_notify'\n"
        "assert kafka_publish.__module__ == 'handlers.kafka_publish'\n"
    )
    assert "handlers" in modules_after(code)


def test_core_modules_load_no_io_library() -> None:
    names = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
    assert {"model", "codec", "fold", "change"} <= set(names)
    loaded = modules_after("\n".join(f"import consumer.core.{name}" for name in names))
    assert {f"consumer.core.{name}" for name in names} <= loaded
    # pydantic (the model's one dependency) loads importlib.metadata to find its plugins,
    # and with it email.utils, which imports socket (never used): that much is pydantic's.
    pydantic_alone = modules_after(
        "import pydantic\nclass M(pydantic.BaseModel):\n    x: int\nM(x=1)"
    )
    assert pydantic_alone & IO_LIBRARIES <= {"socket"}
    assert (loaded - pydantic_alone) & IO_LIBRARIES == set()
    assert loaded & (IO_LIBRARIES - {"socket"}) == set()


# ---------------------------------------------------------------- the delivery policy


async def _noop(change: PhaseChange) -> None:
    del change


def test_policy_defaults() -> None:
    policy = DeliveryPolicy()
    assert dataclasses.astuple(policy) == (8, 30.0, 8, 0.5, 300.0, 86400.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 3  # type: ignore[misc]


def test_every_declaration_starts_from_the_one_policy() -> None:
    assert on()(_noop).policy == DeliveryPolicy()
    assert kafka_publish("t", {"bootstrap_servers": "127.0.0.1:9"}).policy == DeliveryPolicy()
    notify = http_notify("https://example.com/hook", "s3cret")
    # The notifier's request timeout is its own; the dispatcher's cut-off sits above it.
    assert dataclasses.replace(notify.policy, timeout_s=30.0) == DeliveryPolicy()
    assert notify.policy.timeout_s > 10.0
    # The log keeps its own, narrower policy, still a DeliveryPolicy.
    assert log_changes().policy == DeliveryPolicy(
        concurrency=1, timeout_s=10.0, max_attempts=3, max_age_s=60.0
    )


def test_settings_build_the_policy_at_the_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHASEWATCH_DISPATCH_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("PHASEWATCH_DISPATCH_MAX_AGE_S", raising=False)
    monkeypatch.delenv("PHASEWATCH_DISPATCH_CONCURRENCY", raising=False)
    monkeypatch.delenv("PHASEWATCH_HANDLER_TIMEOUT_S", raising=False)
    assert Settings(_env_file=None).delivery_policy() == DeliveryPolicy()
    tuned = Settings(
        _env_file=None, dispatch_max_attempts=3, dispatch_concurrency=2, handler_timeout_s=5
    ).delivery_policy()
    assert tuned == DeliveryPolicy(concurrency=2, timeout_s=5.0, max_attempts=3)


def test_subscription_reads_its_policy_by_the_old_names() -> None:
    sub = on(max_attempts=3, backoff_s=1, max_backoff_s=4)(_noop)
    assert (sub.max_attempts, sub.backoff_s, sub.max_backoff_s) == (3, 1.0, 4.0)
    assert sub.policy.backoff.ceiling(1) == 1.0 and sub.policy.backoff.ceiling(5) == 4.0
    assert sub.policy.gives_up(3, 0) and not sub.policy.gives_up(2, 0)
    assert sub.policy.gives_up(1, 86400.0)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"concurrency": 0}, ValueError, "concurrency"),
        ({"max_attempts": True}, TypeError, "max_attempts"),
        ({"timeout_s": float("nan")}, ValueError, "timeout_s"),
        ({"max_age_s": 0}, ValueError, "max_age_s"),
        ({"backoff_s": 2, "max_backoff_s": 1}, ValueError, "max_backoff_s"),
    ],
)
def test_an_impossible_policy_is_refused_when_built(
    fields: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        DeliveryPolicy(**fields)  # type: ignore[arg-type]
