"""Handlers: the API users write phase-change reactions against, and the built-ins.

A handler is an async function taking a :class:`PhaseChange`. Declare what it wants with
:func:`on`, which turns it into a :class:`Subscription`; point ``PHASEWATCH_HANDLERS`` at
its ``module:attribute`` reference::

    from handlers import PermanentError, Phase, PhaseChange, on

    @on(phase=Phase.COMPLETED, type="upload")
    async def publish(change: PhaseChange) -> None:
        ...  # raise to have the change retried; PermanentError to give up at once

Built-ins: :func:`http_notify` (signed POSTs; receivers check them with
:func:`verify_notification`), :func:`kafka_publish`, :func:`log_changes`, and
:func:`from_settings`, which builds those the settings enable.

This package imports only ``consumer``'s public API.
"""

from consumer import Handler, PermanentError, Phase, PhaseChange, Subscription, TaskType
from handlers.builtin import from_settings
from handlers.http_notify import NotifyError, http_notify
from handlers.kafka_publish import kafka_publish
from handlers.log import log_changes
from handlers.signing import InvalidNotification, verify_notification
from handlers.subscribe import on

__all__ = [
    "Handler",
    "InvalidNotification",
    "NotifyError",
    "PermanentError",
    "Phase",
    "PhaseChange",
    "Subscription",
    "TaskType",
    "from_settings",
    "http_notify",
    "kafka_publish",
    "log_changes",
    "on",
    "verify_notification",
]
