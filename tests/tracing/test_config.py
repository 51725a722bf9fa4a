"""When tracing turns on, from the SDK's own OTEL_* variables; what stops the start; and
that off costs nothing (OpenTelemetry is not even imported)."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from consumer import tracing
from consumer.settings import ConfigError
from tests.support import REPO

_OTEL_TRACES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _OTEL_TRACES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("env", "asked"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "pw"}, None),  # a name alone asks for nothing
        ({"OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_TRACES_EXPORTER": " None "}, None),
        ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ),
        # An explicit "none" wins over an endpoint set for other signals.
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, None),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, None),
    ],
)
def test_which_variables_ask_for_traces(env: dict[str, str], asked: str | None) -> None:
    assert tracing.requested_by(env) == asked


def test_not_asked_configures_nothing() -> None:
    assert tracing.configure() is False
    assert not tracing.enabled()


def test_an_unknown_exporter_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,nonesuch")
    with pytest.raises(ConfigError, match=r"^OTEL_TRACES_EXPORTER: no trace exporter 'nonesuch'"):
        tracing.configure()
    assert not tracing.enabled()


def test_an_unknown_otlp_protocol_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ConfigError, match=r"^OTEL_EXPORTER_OTLP_PROTOCOL: 'carrier-pigeon'"):
        tracing.configure()
    assert not tracing.enabled()


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None,
    reason="the gRPC exporter is installed",
)
def test_grpc_without_its_exporter_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    with pytest.raises(
        ConfigError, match=r"^OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: .*otlp-proto-grpc installed"
    ):
        tracing.configure()


def test_asked_without_the_extra_warns_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    # As if the extra were not installed: importing opentelemetry fails.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with caplog.at_level(logging.WARNING, logger="consumer.tracing"):
        assert tracing.configure() is False
    assert not tracing.enabled()
    (record,) = caplog.records
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in record.getMessage()
    assert "phasewatch[otel]" in record.getMessage()


def test_off_imports_no_opentelemetry() -> None:
    """The service, its handlers and the CLI, imported and configured with no OTEL_*
    variable asking: not one opentelemetry module is loaded."""
    code = textwrap.dedent(
        """
        import sys
        import consumer.cli.main, consumer.service, handlers.http_notify, handlers.kafka_publish
        from consumer import tracing
        assert tracing.configure() is False
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        print("clean")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"
