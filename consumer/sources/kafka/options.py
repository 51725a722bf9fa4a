"""How to reach the brokers, and what each Kafka component is configured with: plain
frozen values built from :class:`~consumer.settings.Settings` at the edge, so nothing
under ``consumer.sources.kafka`` reads settings itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from aiokafka.helpers import create_ssl_context

__all__ = [
    "BrokersUnreachable",
    "KafkaConnection",
    "SourceOptions",
    "client_options",
    "partition_name",
]


class BrokersUnreachable(ConnectionError):
    """A Kafka client could not start: no broker answered at the bootstrap servers."""


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """Connection options shared by consumers and producers (security included)."""

    bootstrap_servers: str
    client_id: str = "phasewatch"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None  # the secret itself: keep this object out of logs
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __repr__(self) -> str:
        # A dataclass repr would print the SASL password.
        return f"KafkaConnection({self.bootstrap_servers!r}, {self.security_protocol})"


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """What the consumer-group source consumes, and how."""

    topics: tuple[str, ...]
    group_id: str = "phasewatch"
    max_batch: int = 2000
    dlq_suffix: str = ".dlq"
    # How long the member may be out of its group (starting, or between a revocation and
    # the next assignment) before /readyz says so.
    join_grace_s: float = 30.0
    # aiokafka's metadata_max_age_ms, in seconds: how often the consumer refreshes what it
    # knows of its topics, so the longest a topic created after start (or a partition
    # added) goes unconsumed. Each refresh is one small request naming these topics.
    metadata_max_age_s: float = 5.0


def client_options(connection: KafkaConnection) -> dict[str, Any]:
    """Keyword arguments for aiokafka's clients."""
    options: dict[str, Any] = {
        "bootstrap_servers": connection.bootstrap_servers,
        "client_id": connection.client_id,
        "security_protocol": connection.security_protocol,
    }
    if connection.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=connection.ssl_cafile,
            certfile=connection.ssl_certfile,
            keyfile=connection.ssl_keyfile,
        )
    if connection.sasl_mechanism:
        options["sasl_mechanism"] = connection.sasl_mechanism
        options["sasl_plain_username"] = connection.sasl_username
        options["sasl_plain_password"] = connection.sasl_password
    return options


def partition_name(tp: Any) -> str:
    """``topic[partition]``, as logs, ``/readyz`` and metrics name a partition."""
    return f"{tp.topic}[{tp.partition}]"
