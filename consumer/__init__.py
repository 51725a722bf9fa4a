"""phasewatch's engine: ingest Livepeer task events, fold them into the latest Task per
id, record phase changes and hand them to handlers.

This is the public surface that handler code (the ``handlers`` package and users' own
modules) may import; everything else is internal and may change. It holds:

* what a handler receives and declares: :class:`PhaseChange`, :class:`Task`,
  :class:`Phase`, :class:`TaskType`, :data:`Handler`, :class:`Subscription`,
  :class:`DeliveryPolicy`, :class:`PermanentError`, and :func:`redact` (to hide
  credentials in whatever a handler sends on);
* what the built-in handlers are built from, for users who build them by hand:
  :class:`Settings` (the argument of ``handlers.from_settings``), :func:`client_options`
  (aiokafka options from ``Settings.kafka_connection()``, the ``options`` of
  ``handlers.kafka_publish``) and :class:`KafkaPublisher` (the producer behind it).

The last three are loaded on first use (module ``__getattr__``), so that importing the
handler API does not import pydantic-settings or aiokafka. The event codec, the stores
and the Kafka connection type are internal: handlers never see an event, only changes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from consumer.core.change import PhaseChange
from consumer.core.model import Phase, Task, TaskType
from consumer.core.secrets import redact
from consumer.dispatch.policy import DeliveryPolicy
from consumer.dispatch.subscription import Handler, PermanentError, Subscription

if TYPE_CHECKING:
    from consumer.settings import Settings
    from consumer.sources.kafka.options import client_options
    from consumer.sources.kafka.producers import KafkaPublisher

__all__ = [
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
]

__version__ = "0.1.0"

# name -> module that defines it; imported when the name is first read.
_LAZY = {
    "KafkaPublisher": "consumer.sources.kafka.producers",
    "Settings": "consumer.settings",
    "client_options": "consumer.sources.kafka.options",
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
