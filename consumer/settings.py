"""Configuration, read once at start from ``PHASEWATCH_*`` environment variables (and a
``.env`` file if present). Nothing deeper in the package reads the environment: the
service, the CLI and the tests build a :class:`Settings` and pass what each part needs.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.changes_retention import Retention, parse_retention
from consumer.core.signature import parse_secrets
from consumer.dispatch.policy import DeliveryPolicy
from consumer.sources.kafka.options import KafkaConnection, SourceOptions
from consumer.stale import parse_stale

__all__ = ["ConfigError", "Settings", "describe_invalid"]

# Read by the test suite and the benchmarks, not by the service.
_NOT_SETTINGS = ("PHASEWATCH_TEST_", "PHASEWATCH_BENCH_", "PHASEWATCH_SHARED_DIR")


class ConfigError(ValueError):
    """A setting the service cannot start with. The message is one line that names the
    ``PHASEWATCH_*`` variable and what is wrong; the CLI prints it and exits 2."""


def describe_invalid(exc: ValidationError) -> str:
    """One line for a settings validation error: each variable and what is wrong with it.
    Values are not repeated: one of them may be a secret."""
    parts = []
    for problem in exc.errors():
        where = problem["loc"][0] if problem["loc"] else ""
        name = str(where) if str(where).startswith("PHASEWATCH_") else f"PHASEWATCH_{where}"
        message = problem["msg"].removeprefix("Value error, ")
        parts.append(f"{name.upper()}: {message}" if where else message)
    return "; ".join(parts)


_POLICY = DeliveryPolicy()  # the handler defaults, spelled once there


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PHASEWATCH_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    database_url: str = Field(
        "sqlite:///./phasewatch.db",
        description="Where state lives: sqlite:///PATH (embedded default), "
        "postgresql://USER@HOST:PORT/DB (shared by several replicas) or memory:// "
        "(nothing kept; demos and tests).",
    )
    database_password: SecretStr | None = Field(
        None,
        description="PostgreSQL password, when the URL carries none (keeps it out of the URL).",
    )
    database_pool_size: int = Field(
        10, ge=2, le=1000, description="PostgreSQL connections per process (at least 2)."
    )
    database_migrate: bool = Field(
        True,
        description="Apply pending schema migrations at start (false: refuse to start "
        "until `phasewatch migrate` has run them).",
    )
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        "FULL",
        description="FULL: an acknowledged event survives power loss. NORMAL: survives a "
        "process crash, may lose the last batches on power loss; fewer fsyncs.",
    )
    sqlite_writer: Literal["thread", "process"] = Field(
        "process",
        description="Where `serve` folds and commits into SQLite: a child process (a "
        "second core for ingestion, ~+25% webhooks/s, see bench/) or a thread.",
    )
    http_host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    http_port: int = Field(8080, ge=0, le=65535, description="Port the HTTP server binds.")
    webhook_secret: SecretStr | None = Field(
        None,
        description="Livepeer webhook shared secret, or a comma-separated list of them "
        "(several projects, rotation), each optionally name=secret; the history records "
        "which one (its name, else its 0-based index) verified each delivery. Unset: "
        "unsigned webhooks are accepted (a warning is logged at start).",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_secrets(value.get_secret_value())  # its messages never quote a secret
        return value

    webhook_tolerance_s: int = Field(
        300,
        ge=0,
        description="Freshness window for the signature timestamp, seconds; 0 "
        "disables it (replaying archives).",
    )
    webhook_max_body_bytes: int = Field(
        1024 * 1024, gt=0, description="Larger webhook bodies are refused with 413."
    )
    handlers: str = Field(
        "", description="Comma-separated module:attribute references to async handlers."
    )
    handler_timeout_s: float = Field(
        _POLICY.timeout_s,
        gt=0,
        description="A handler call running longer is cancelled and logged.",
    )
    api_token: SecretStr | None = Field(
        None, description="When set, the read API requires 'Authorization: Bearer <token>'."
    )
    ingest_max_batch: int = Field(
        512, gt=0, description="Most events committed in one store transaction."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one object per line with time, level, logger, message."
    )
    access_log: bool = Field(False, description="Log one line per HTTP request.")
    liveness_max_lag_s: float = Field(
        10.0,
        gt=0,
        description="/healthz answers 503 when the event loop last ran this much late.",
    )

    # -- Kafka (all optional: without bootstrap servers phasewatch runs on webhooks alone)
    kafka_bootstrap_servers: str | None = Field(
        None, description="host:port[,host:port]. Set: consume the topics in a consumer group."
    )
    kafka_topics: str = Field(
        "livepeer.task-events", description="Comma-separated topics to consume."
    )
    kafka_group_id: str = Field("phasewatch", description="Consumer group id.")
    kafka_dlq_suffix: str = Field(
        ".dlq", description="Poison records go to <topic><suffix>, reason in headers."
    )
    kafka_max_batch: int = Field(
        2000, gt=0, description="Most records folded and committed in one store transaction."
    )
    kafka_join_grace_s: float = Field(
        30.0,
        gt=0,
        description="/readyz answers 503 once the consumer is out of its group this long.",
    )
    kafka_metadata_max_age_s: float = Field(
        5.0,
        ge=0.1,
        description="How often the consumer refreshes topic metadata (one small request): "
        "a topic created after start, or a partition added, is consumed within this long.",
    )
    sqlite_fold_here: float = Field(
        0.7,
        ge=0,
        le=1,
        # The name it had while it was a Kafka setting still works.
        validation_alias=AliasChoices("PHASEWATCH_SQLITE_FOLD_HERE", "PHASEWATCH_KAFKA_FOLD_HERE"),
        description="SQLite writer process: share of the tasks (by Kafka record key) whose"
        " records the consumer's process decodes and folds itself; the writer process"
        " decodes and folds the rest and writes everything. 0.7 keeps both busy on two cores.",
    )
    kafka_client_id: str = Field("phasewatch", description="Client id sent to the brokers.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How to reach the brokers."
    )
    kafka_sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None
    ) = Field(None, description="SASL mechanism, with SASL_* protocols.")
    kafka_sasl_username: str | None = Field(None, description="SASL username.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle to verify the brokers.")
    kafka_ssl_certfile: str | None = Field(None, description="Client certificate (mTLS).")
    kafka_ssl_keyfile: str | None = Field(None, description="Client private key (mTLS).")
    # -- built-in handlers (each enabled by setting its first variable)
    notify_url: str | None = Field(
        None, description="Built-in HTTP notify: POST each phase change here, signed."
    )
    notify_secret: SecretStr | None = Field(
        None, description="HMAC secret for notifications (Standard Webhooks, whsec_...)."
    )
    notify_phases: str = Field(
        "", description="Comma-separated phases to notify (empty: every phase change)."
    )
    notify_timeout_s: float = Field(10.0, gt=0, description="HTTP notify request timeout.")
    publish_topic: str | None = Field(
        None, description="Built-in Kafka publish: each phase change as a record here."
    )
    log_changes: bool = Field(False, description="Built-in log: one JSON line per change.")
    notify_stale: str = Field(
        "",
        description="Built-in HTTP notify also POSTs a stale alert (kind stale) for a task "
        "that stays in a phase with no newer snapshot this long: phase:seconds, "
        "comma-separated (e.g. running:300,processing:900); empty: none.",
    )
    log_stale: str = Field(
        "",
        description="Built-in log also prints a stale alert line, as PHASEWATCH_NOTIFY_STALE "
        "(phase:seconds, ...); set alone, the log prints only those alerts.",
    )

    @field_validator("notify_stale", "log_stale")
    @classmethod
    def _stale_items(cls, value: str) -> str:
        parse_stale(value)  # phases and numbers: nothing secret in the message
        return value.strip()

    def notify_stale_for(self) -> dict[str, float]:
        """``PHASEWATCH_NOTIFY_STALE`` as phase -> seconds."""
        return parse_stale(self.notify_stale)

    def log_stale_for(self) -> dict[str, float]:
        """``PHASEWATCH_LOG_STALE`` as phase -> seconds."""
        return parse_stale(self.log_stale)

    dispatch_max_attempts: int = Field(
        _POLICY.max_attempts,
        gt=0,
        description="Attempts per (change, handler) before dead-lettering.",
    )
    dispatch_max_age_s: float = Field(
        _POLICY.max_age_s, gt=0, description="Give up retrying a delivery after this many seconds."
    )
    dispatch_lanes: int = Field(
        16,
        ge=1,
        le=1024,
        description="The outbox is split into this many lanes by task id, each with its "
        "own lease, so that replicas share delivery (order per task holds in a lane).",
    )
    dispatch_lease_s: float = Field(
        15.0,
        ge=1,
        description="A lane whose holder stopped renewing is taken over after this long.",
    )
    dispatch_concurrency: int = Field(
        _POLICY.concurrency,
        gt=0,
        description="Concurrent calls per handler (one at a time per task).",
    )
    webhook_forward: bool = Field(
        False,
        description="With Kafka: produce verified webhooks to the first topic "
        "(acks=all) instead of storing them; the consumer materializes them.",
    )
    # -- reconciling with Livepeer Studio's task list (spec §7)
    livepeer_api_key: SecretStr | None = Field(
        None,
        description="Livepeer Studio API key: set, `serve` reconciles with Studio's task "
        "list (tasks whose webhooks were lost) and `phasewatch reconcile` works.",
    )
    livepeer_api_url: str = Field(
        "https://livepeer.studio/api",
        description="Livepeer Studio API base; the reconciler lists {url}/task.",
    )
    reconcile_interval_s: float | None = Field(
        None,
        ge=0,
        description="Seconds between reconcile passes in `serve` (one replica at a time, "
        "under a lease); unset: 300 when PHASEWATCH_LIVEPEER_API_KEY is set; 0 disables.",
    )
    reconcile_overlap_s: float = Field(
        60.0,
        ge=0,
        description="Each reconcile pass starts this far before the last one's watermark "
        "(updates Studio commits late); what is re-read is deduplicated.",
    )

    # -- the changes feed (GET /changes, /changes/stream)
    changes_retention: str = Field(
        "7d",
        description="How long the outbox keeps changes for the feed: a time (7d, 12h, 30m, "
        "90s) or a count (100000: the newest that many); 0/off keeps all. The history "
        "is never pruned, nor a change a handler still needs.",
    )
    changes_retention_interval_s: float = Field(
        60.0, gt=0, description="How often `serve` prunes the outbox (one replica at a time)."
    )
    changes_heartbeat_s: float = Field(
        15.0, gt=0, description="/changes/stream sends a keep-alive comment this often when idle."
    )
    changes_stream_max_buffer_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="A /changes/stream client whose connection buffers more is dropped.",
    )
    changes_stream_drain_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A /changes/stream client that takes longer to take a write is dropped.",
    )
    changes_linger_s: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Feed readers are woken at most this often: under load, one wake "
        "carries the commits of this span (less CPU per stream, at most this much later).",
    )

    @field_validator("changes_retention")
    @classmethod
    def _known_retention(cls, value: str) -> str:
        parse_retention(value)
        return value.strip().lower()

    def changes_retention_policy(self) -> Retention:
        return parse_retention(self.changes_retention)

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "memory://", "postgresql://", "postgres://")):
            # Only the scheme is repeated: the rest of a URL may carry a password.
            what = (
                f"unknown database scheme {value.partition('://')[0]!r}"
                if "://" in value
                else "not a URL"
            )
            raise ValueError(
                f"{what}: use sqlite:///PATH, postgresql://USER@HOST:PORT/DB or memory://"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if not isinstance(logging.getLevelName(value.upper()), int):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value.upper()

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str]) -> list[str]:
        """``PHASEWATCH_*`` names in ``environ`` that no setting reads (a typo is ignored
        silently otherwise), each with the nearest known name when there is one."""
        known = set()
        for name, info in cls.model_fields.items():
            known.add(f"PHASEWATCH_{name.upper()}")
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                known.update(str(choice) for choice in alias.choices)
        found = []
        for variable in sorted(environ):
            if not variable.startswith("PHASEWATCH_") or variable in known:
                continue
            if variable.startswith(_NOT_SETTINGS):
                continue
            close = difflib.get_close_matches(variable, known, n=1)
            found.append(f"{variable} (did you mean {close[0]}?)" if close else variable)
        return found

    def topics(self) -> list[str]:
        return [t.strip() for t in self.kafka_topics.split(",") if t.strip()]

    def kafka_connection(self) -> KafkaConnection:
        """How to reach the brokers, as the Kafka components take it."""
        if not self.kafka_bootstrap_servers:
            raise ValueError("PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS is not set")
        password = self.kafka_sasl_password
        return KafkaConnection(
            bootstrap_servers=self.kafka_bootstrap_servers,
            client_id=self.kafka_client_id,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=password.get_secret_value() if password else None,
            ssl_cafile=self.kafka_ssl_cafile,
            ssl_certfile=self.kafka_ssl_certfile,
            ssl_keyfile=self.kafka_ssl_keyfile,
        )

    def kafka_source(self) -> SourceOptions:
        """What the consumer-group source consumes."""
        return SourceOptions(
            topics=tuple(self.topics()),
            group_id=self.kafka_group_id,
            max_batch=self.kafka_max_batch,
            dlq_suffix=self.kafka_dlq_suffix,
            join_grace_s=self.kafka_join_grace_s,
            metadata_max_age_s=self.kafka_metadata_max_age_s,
        )

    def delivery_policy(self) -> DeliveryPolicy:
        """The policy of handlers given as bare callables: ``PHASEWATCH_DISPATCH_*`` and
        ``PHASEWATCH_HANDLER_TIMEOUT_S`` over :class:`DeliveryPolicy`'s defaults. The
        built-ins take its concurrency, attempts and age (their timeouts are their own)."""
        return DeliveryPolicy(
            concurrency=self.dispatch_concurrency,
            timeout_s=self.handler_timeout_s,
            max_attempts=self.dispatch_max_attempts,
            max_age_s=self.dispatch_max_age_s,
        )

    def handler_refs(self) -> list[str]:
        return [ref.strip() for ref in self.handlers.split(",") if ref.strip()]

    def reconcile_every_s(self) -> float:
        """Seconds between the service's reconcile passes; 0: no reconcile loop."""
        if self.livepeer_api_key is None:
            return 0.0
        return 300.0 if self.reconcile_interval_s is None else self.reconcile_interval_s

    @model_validator(mode="after")
    def _reconcile_needs_key(self) -> Settings:
        if self.reconcile_interval_s and self.livepeer_api_key is None:
            raise ValueError(
                "PHASEWATCH_RECONCILE_INTERVAL_S needs PHASEWATCH_LIVEPEER_API_KEY (the key "
                "the reconciler lists tasks with)"
            )
        return self

    @field_validator("livepeer_api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http:// or https:// URL")  # the value may hold a key
        return value.rstrip("/")

    @model_validator(mode="after")
    def _forward_needs_kafka(self) -> Settings:
        if self.webhook_forward and not self.kafka_bootstrap_servers:
            raise ValueError("webhook_forward needs kafka_bootstrap_servers")
        return self

    @classmethod
    def help_text(cls) -> str:
        """One line per setting, for ``--help``."""
        lines = []
        for name, info in cls.model_fields.items():
            default = info.default
            shown = "unset" if default is None else repr(default)
            lines.append(f"  PHASEWATCH_{name.upper():<28} {info.description} [{shown}]")
        return "\n".join(lines)
