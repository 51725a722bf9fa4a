"""The public surface of ``handlers``, pinned, and its import boundary: the package uses
only names ``consumer`` exports (style: ``handlers`` imports only consumer's public API)."""

from __future__ import annotations

import ast
from pathlib import Path

import consumer
import handlers

PUBLIC = [
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
]


def test_all_is_pinned() -> None:
    assert handlers.__all__ == PUBLIC
    for name in PUBLIC:
        assert getattr(handlers, name) is not None


def test_reexports_are_consumers_own_objects() -> None:
    for name in ("Handler", "PermanentError", "Phase", "PhaseChange", "Subscription", "TaskType"):
        assert getattr(handlers, name) is getattr(consumer, name)
    assert handlers.Task is consumer.Task


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from handlers import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(PUBLIC)


def test_handlers_import_only_consumers_public_api() -> None:
    package = Path(handlers.__file__).parent
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                assert not any(n.startswith("consumer") for n in names), f"{path.name}: {names}"
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("consumer"):
                assert node.module == "consumer", f"{path.name}: from {node.module} import ..."
                for alias in node.names:
                    assert alias.name in consumer.__all__, f"{path.name}: {alias.name}"
