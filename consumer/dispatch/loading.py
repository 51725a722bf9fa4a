"""Resolve ``PHASEWATCH_HANDLERS`` references (``module:attribute``) to subscriptions, and
load the built-in handlers the settings enable.

An attribute may be a :class:`~consumer.dispatch.subscription.Subscription` (what
``@handlers.on(...)`` returns), a bare async callable (every phase change, the delivery
policy from settings), or a list/tuple of either. ``consumer`` never imports the
``handlers`` package statically: the built-ins are loaded here by reference, like user code.

Modules are looked up in the current working directory first, then on ``sys.path``, as
uvicorn and gunicorn do: ``PHASEWATCH_HANDLERS=myhooks:publish phasewatch serve`` run
next to ``myhooks.py`` finds it, although the ``phasewatch`` script lives elsewhere.

Anything wrong with a reference (not ``module:attribute``, no such module, the import
raising, no such attribute, not an async handler, a repeated name) is one
:class:`HandlerLoadError` whose one-line message names the setting and the reference;
``phasewatch`` prints it and exits with status 2.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

from consumer.dispatch.subscription import Subscription
from consumer.settings import Settings

__all__ = ["HandlerLoadError", "load_subscriptions", "resolve"]

BUILTINS_REF = "handlers.builtin:from_settings"
SETTING = "PHASEWATCH_HANDLERS"


class HandlerLoadError(ValueError):
    """A handler reference that cannot be used; the message (one line) says which and why."""

    def __init__(self, message: str) -> None:
        # One line: printed as is after "phasewatch: ", and an exception's own text (a
        # user module raising at import) may span several.
        super().__init__(" ".join(message.split()))


def resolve(ref: str) -> Any:
    """The object a ``module:attribute.path`` reference names."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(f"{SETTING}: {ref!r} is not a module:attribute reference")
    target: Any = _import(module_name, ref)
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerLoadError(
                f"{SETTING}: {ref!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    return target


def load_subscriptions(refs: Sequence[str], settings: Settings) -> list[Subscription]:
    if refs:
        _search_working_directory()
    loaded: list[Subscription] = []
    for ref in refs:
        target = resolve(ref)
        items = list(target) if isinstance(target, list | tuple) else [target]
        for index, item in enumerate(items):
            name = ref if len(items) == 1 else f"{ref}[{index}]"
            loaded.append(_subscription(item, name, ref, settings))
    loaded.extend(_builtins(settings))
    names = [s.name for s in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise HandlerLoadError(f"{SETTING}: handler names must be unique; repeated: {duplicates}")
    return loaded


def _search_working_directory() -> None:
    # A console script's sys.path[0] is its own directory (the venv's bin/), not where
    # the user runs it from. Kept for the process's life: a handler module may import its
    # neighbours later, lazily.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def _import(module_name: str, ref: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise HandlerLoadError(
                f"{SETTING}: {ref!r}: no module named {exc.name!r} "
                f"(looked in {os.getcwd()} and sys.path)"
            ) from None
        # The module exists; something it imports does not.
        raise HandlerLoadError(
            f"{SETTING}: {ref!r}: importing {module_name!r} failed: {exc}"
        ) from exc
    except Exception as exc:
        # The user's module raised while being imported (@on(...) refusing an argument,
        # a typo): their error, told in one line, with its type.
        raise HandlerLoadError(
            f"{SETTING}: {ref!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def _builtins(settings: Settings) -> list[Subscription]:
    if not (settings.notify_url or settings.publish_topic or settings.log_changes):
        return []
    factory = resolve(BUILTINS_REF)
    try:
        enabled = factory(settings)
    except ValueError as exc:
        # An enabled built-in missing a setting: the message names the variable to set.
        raise HandlerLoadError(str(exc)) from exc
    return [_subscription(s, s.name, BUILTINS_REF, settings) for s in enabled]


def _subscription(item: Any, name: str, ref: str, settings: Settings) -> Subscription:
    if isinstance(item, Subscription):
        _check_async(item.fn, item.name, ref)
        return item
    if not callable(item):
        raise HandlerLoadError(
            f"{SETTING}: {ref!r}: {name!r} is not a handler (an async function, what "
            f"@on(...) returns, or a list of them), but a {type(item).__name__}"
        )
    _check_async(item, name, ref)
    return Subscription(name=name, fn=item, policy=settings.delivery_policy())


def _check_async(fn: Any, name: str, ref: str) -> None:
    call = getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)):
        raise HandlerLoadError(
            f"{SETTING}: {ref!r}: handler {name!r} must be an async callable (async def)"
        )
