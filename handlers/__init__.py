"""Handlers: the API users write phase-change reactions against, and the built-ins.

A handler is an async function taking a :class:`PhaseChange`. Declare what it wants with
:func:`on`, which turns it into a :class:`Subscription`; point ``PHASEWATCH_HANDLERS`` at
its ``module:attribute`` reference::

    from handlers import PermanentError, Phase, PhaseChange, on

    @on(phase=Phase.COMPLETED, type="upload")
    async def publish(change: PhaseChange) -> None:
        ...  # raise to have the change retried; PermanentError to give up at once

A subscription can still be awaited like the function it wraps, so a unit test calls
``await publish(PhaseChange.example(task={...}, phase="completed"))`` directly.

Built-ins: :func:`http_notify` (signed POSTs; receivers check them with
:func:`verify_notification`), :func:`kafka_publish`, :func:`log_changes`, and
:func:`from_settings`, which builds those the settings enable. The built-ins are loaded
on first use (module ``__getattr__``): ``import handlers`` alone imports neither aiohttp,
aiokafka nor pydantic-settings, so a handler module (and its tests) pays only for what
it uses.

This package imports only ``consumer``'s public API.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from consumer import Handler, PermanentError, Phase, PhaseChange, Subscription, Task, TaskType
from handlers.signing import InvalidNotification, verify_notification
from handlers.subscribe import on

if TYPE_CHECKING:
    from handlers.builtin import from_settings
    from handlers.http_notify import NotifyError, http_notify
    from handlers.kafka_publish import kafka_publish
    from handlers.log import log_changes

__all__ = [
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

# name -> module that defines it; imported when the name is first read.
_LAZY = {
    "NotifyError": "handlers.http_notify",
    "from_settings": "handlers.builtin",
    "http_notify": "handlers.http_notify",
    "kafka_publish": "handlers.kafka_publish",
    "log_changes": "handlers.log",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """This package, refusing to let a submodule shadow the function of the same name.

    The import system binds each submodule on its package when it is first imported
    (``handlers.http_notify`` the module), and two built-ins share their module's name.
    Whichever import comes first (``from handlers.http_notify import NotifyError``,
    ``handlers.builtin`` importing its parts), ``handlers.http_notify`` must stay the
    function, as it was when this package imported the built-ins eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the module stays reachable in sys.modules; the name is __getattr__'s
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
