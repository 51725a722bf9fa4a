"""phasewatch's engine: ingest Livepeer task events, fold them into the latest Task per
id, record phase changes and hand them to handlers.

This is the public surface that handler code (the ``handlers`` package and users' own
modules) may import; everything else is internal and may change.
"""

from consumer.codec import DecodeError, Event, EventFormat, InvalidEvent, NotAnEvent, NotJSON
from consumer.kafka import KafkaPublisher, client_options
from consumer.model import Phase, Task, TaskType
from consumer.secrets import redact
from consumer.settings import Settings
from consumer.subscription import Handler, PermanentError, PhaseChange, Subscription

__all__ = [
    "DecodeError",
    "Event",
    "EventFormat",
    "Handler",
    "InvalidEvent",
    "KafkaPublisher",
    "NotAnEvent",
    "NotJSON",
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
