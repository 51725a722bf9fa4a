"""Resolve ``PHASEWATCH_HANDLERS`` references (``module:attribute``) to subscriptions, and
load the built-in handlers the settings enable.

An attribute may be a :class:`~consumer.core.change.Subscription` (what
``@handlers.on(...)`` returns), a bare async callable (every phase change, the default
delivery policy from settings), or a list/tuple of either. ``consumer`` never imports the
``handlers`` package statically: the built-ins are loaded here by reference, like user code.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

from consumer.dispatch.subscription import Subscription
from consumer.settings import Settings

__all__ = ["HandlerLoadError", "load_subscriptions", "resolve"]

BUILTINS_REF = "handlers.builtin:from_settings"


class HandlerLoadError(ValueError):
    """A handler reference that cannot be used; the message says which and why."""


def resolve(ref: str) -> Any:
    """The object a ``module:attribute.path`` reference names."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(f"handler reference {ref!r} is not module:attribute")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerLoadError(f"cannot import {module_name!r} for {ref!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerLoadError(f"{module_name!r} has no attribute {attr!r}") from None
    return target


def load_subscriptions(refs: Sequence[str], settings: Settings) -> list[Subscription]:
    loaded: list[Subscription] = []
    for ref in refs:
        target = resolve(ref)
        items = list(target) if isinstance(target, list | tuple) else [target]
        for index, item in enumerate(items):
            name = ref if len(items) == 1 else f"{ref}[{index}]"
            loaded.append(_subscription(item, name, settings))
    if settings.notify_url or settings.publish_topic or settings.log_changes:
        factory = resolve(BUILTINS_REF)
        loaded.extend(_subscription(s, s.name, settings) for s in factory(settings))
    names = [s.name for s in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise HandlerLoadError(f"handler names must be unique; repeated: {duplicates}")
    return loaded


def _subscription(item: Any, name: str, settings: Settings) -> Subscription:
    if isinstance(item, Subscription):
        _check_async(item.fn, item.name)
        return item
    if not callable(item):
        raise HandlerLoadError(f"handler {name!r} is not callable")
    _check_async(item, name)
    return Subscription(name=name, fn=item, policy=settings.delivery_policy())


def _check_async(fn: Any, name: str) -> None:
    call = getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)):
        raise HandlerLoadError(f"handler {name!r} must be an async callable (async def)")
