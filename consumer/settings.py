"""Configuration, read once at start from ``PHASEWATCH_*`` environment variables (and a
``.env`` file if present). Nothing deeper in the package reads the environment: the
service, the CLI and the tests build a :class:`Settings` and pass what each part needs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PHASEWATCH_", env_file=".env", extra="ignore", frozen=True
    )

    database_url: str = Field(
        "sqlite:///./phasewatch.db",
        description="Where state lives: sqlite:///PATH (embedded default) or memory:// "
        "(nothing kept; demos and tests).",
    )
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        "FULL",
        description="FULL: an acknowledged event survives power loss. NORMAL: survives a "
        "process crash, may lose the last batches on power loss; fewer fsyncs.",
    )
    http_host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    http_port: int = Field(8080, ge=0, le=65535, description="Port the HTTP server binds.")
    webhook_secret: SecretStr | None = Field(
        None,
        description="Livepeer webhook shared secret. Unset: unsigned webhooks are accepted "
        "(a warning is logged at start).",
    )
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
        30.0, gt=0, description="A handler call running longer is cancelled and logged."
    )
    api_token: SecretStr | None = Field(
        None, description="When set, the read API requires 'Authorization: Bearer <token>'."
    )
    ingest_max_batch: int = Field(
        512, gt=0, description="Most events committed in one store transaction."
    )
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "memory://")):
            raise ValueError("database_url must start with sqlite:/// or memory://")
        return value

    def handler_refs(self) -> list[str]:
        return [ref.strip() for ref in self.handlers.split(",") if ref.strip()]

    @classmethod
    def help_text(cls) -> str:
        """One line per setting, for ``--help``."""
        lines = []
        for name, info in cls.model_fields.items():
            default = info.default
            shown = "unset" if default is None else repr(default)
            lines.append(f"  PHASEWATCH_{name.upper():<28} {info.description} [{shown}]")
        return "\n".join(lines)
