"""phasewatch's engine: ingest Livepeer task events, fold them into the latest Task per
id, record phase changes and hand them to handlers.

This is the public surface that handler code (the ``handlers`` package and users' own
modules) may import; everything else is internal and may change.
"""

from consumer.codec import DecodeError, Event, EventFormat, InvalidEvent, NotAnEvent, NotJSON
from consumer.dispatch import Handler, PhaseChange
from consumer.model import Phase, Task, TaskType
from consumer.secrets import redact

__all__ = [
    "DecodeError",
    "Event",
    "EventFormat",
    "Handler",
    "InvalidEvent",
    "NotAnEvent",
    "NotJSON",
    "Phase",
    "PhaseChange",
    "Task",
    "TaskType",
    "redact",
]

__version__ = "0.1.0"
