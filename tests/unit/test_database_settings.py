"""The database settings: which URLs are accepted, and that a password never shows."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from consumer.settings import Settings, describe_invalid
from consumer.store.postgres.store import display_url


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///./phasewatch.db",
        "memory://",
        "postgresql://pw@db.internal:5432/phasewatch",
        "postgres://pw@db.internal/phasewatch",
    ],
)
def test_known_schemes_are_accepted(url: str) -> None:
    assert Settings(database_url=url).database_url == url


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mysql://root:hunter2@db/x", "unknown database scheme 'mysql'"),
        ("hunter2", "not a URL"),
    ],
)
def test_an_unknown_scheme_is_named_without_the_rest_of_the_url(url: str, named: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(database_url=url)
    message = describe_invalid(info.value)
    assert message.startswith(f"PHASEWATCH_DATABASE_URL: {named}")
    assert "hunter2" not in message


def test_the_password_setting_is_secret() -> None:
    settings = Settings(database_password="hunter2")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.database_password is not None
    assert settings.database_password.get_secret_value() == "hunter2"


def test_display_url_drops_only_the_password() -> None:
    assert (
        display_url("postgresql://app:hunter2@db:5432/pw?sslmode=require")
        == "postgresql://app@db:5432/pw?sslmode=require"
    )
    assert display_url("postgresql://app@db/pw") == "postgresql://app@db/pw"
