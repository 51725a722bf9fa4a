"""phasewatch's engine: ingest Livepeer task events, fold them into the latest Task per
id, record phase changes and hand them to handlers.

This is the public surface that handler code (the ``handlers`` package and users' own
modules) may import; everything else is internal and may change.
"""

from consumer.core.change import PhaseChange
from consumer.core.codec import DecodeError, Event, EventFormat, InvalidEvent, NotAnEvent, NotJSON
from consumer.core.model import Phase, Task, TaskType
from consumer.core.secrets import redact
from consumer.dispatch.policy import DeliveryPolicy
from consumer.dispatch.subscription import Handler, PermanentError, Subscription
from consumer.settings import Settings
from consumer.sources.kafka.options import KafkaConnection, client_options
from consumer.sources.kafka.producers import KafkaPublisher

__all__ = [
    "DecodeError",
    "DeliveryPolicy",
    "Event",
    "EventFormat",
    "Handler",
    "InvalidEvent",
    "KafkaConnection",
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
