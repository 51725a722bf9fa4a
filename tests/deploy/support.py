"""Reading the deployment files of ``deploy/`` as the tools that use them would: the
Dockerfile's instructions, the compose file, and the kustomize base built in Python
(``kustomize`` is not installed here)."""

from __future__ import annotations

import inspect
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from consumer.dispatch.dispatcher import Dispatcher
from consumer.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "phasewatch.env.example"
K8S = DEPLOY / "k8s"
HERE = Path(__file__).resolve().parent
COMPOSE_SCHEMA = HERE / "compose-spec.json"
VENV_BIN = Path(sys.executable).parent

# The Kubernetes versions the manifests are validated against: the oldest still in
# common use and the newest kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


# ----------------------------------------------------------------------------- stopping

# After SIGTERM phasewatch stops listening, finishes the HTTP requests in flight (each
# waits for its commit), commits what the ingestor queued, stops Kafka after its batch,
# gives handler calls in flight the dispatcher's drain, runs the handlers' on_stop hooks
# (the dispatcher gives each 5 s at most) and closes the store.
HANDLER_ON_STOP_S = 5.0
# HTTP requests in flight, queued commits, the Kafka batch and leaving the group, the
# store: seconds each on a healthy store.
OTHER_STOP_WORK_S = 10.0


def dispatcher_drain_s() -> float:
    drain = inspect.signature(Dispatcher.__init__).parameters["drain_s"].default
    assert isinstance(drain, int | float)
    return float(drain)


def grace_budget_s() -> float:
    """The seconds a graceful stop may take after SIGTERM, at worst: what an
    orchestrator must wait before it kills (on top of a preStop hook)."""
    return dispatcher_drain_s() + HANDLER_ON_STOP_S + OTHER_STOP_WORK_S


# ----------------------------------------------------------------------------- settings


def setting_names() -> set[str]:
    """Every variable a phasewatch setting reads."""
    return {f"PHASEWATCH_{name.upper()}" for name in Settings.model_fields}


def secret_setting_names() -> set[str]:
    """The settings that hold secrets (``SecretStr``): the Secret's, never the ConfigMap's."""
    return {
        f"PHASEWATCH_{name.upper()}"
        for name, info in Settings.model_fields.items()
        if "SecretStr" in str(info.annotation)
    }


def not_settings(names: set[str]) -> list[str]:
    """The ``PHASEWATCH_*`` names among ``names`` that no setting reads."""
    return Settings.unknown_variables(dict.fromkeys(names, ""))


# ----------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    arguments: str  # as written, continuations joined
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """The ``ENV key=value ...`` pairs in order (later ones win)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.arguments):
                key, sep, value = token.partition("=")
                assert sep, f"line {instruction.line}: ENV {token!r} is not key=value"
                values[key] = value
        return values


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile, each with its instructions (comments dropped, lines
    continued with a backslash joined)."""
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    for number, text in logical:
        keyword, _, arguments = text.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip(), number)
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
            continue
        assert stages, f"line {number}: {keyword} before FROM"
        stages[-1].instructions.append(instruction)
    return stages


def exec_form(instruction: Instruction | None) -> list[str]:
    """The argv of an exec-form (JSON array) CMD, ENTRYPOINT or HEALTHCHECK CMD."""
    assert instruction is not None, "instruction missing"
    text = instruction.arguments
    if instruction.keyword == "HEALTHCHECK":
        text = re.sub(r"^(--\S+\s+)*", "", text)
        assert text.startswith("CMD "), f"HEALTHCHECK without CMD: {text!r}"
        text = text.removeprefix("CMD ").strip()
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def healthcheck_options(instruction: Instruction) -> dict[str, str]:
    return dict(re.findall(r"--([a-z-]+)=(\S+)", instruction.arguments))


def image_command() -> list[str]:
    """What a container of the image runs: ENTRYPOINT + CMD of the final stage."""
    final = parse_dockerfile()[-1]
    entry = final.last("ENTRYPOINT")
    return (exec_form(entry) if entry else []) + exec_form(final.last("CMD"))


def duration_s(value: str) -> float:
    """A compose / Docker duration (``45s``, ``1m30s``, ``500ms``) in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ----------------------------------------------------------------------------- YAML


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def env_file(path: Path) -> dict[str, str]:
    """A compose env file: ``NAME=value`` lines, comments and blank lines skipped."""
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not NAME=value"
        values[key.strip()] = value.strip()
    return values


# ----------------------------------------------------------------------------- kustomize

# What the Python build below understands; a kustomization using more fails the tests
# until the build learns it.
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "images"}


def kustomization() -> dict[str, Any]:
    data = load_yaml(K8S / "kustomization.yaml")
    assert isinstance(data, dict)
    return data


def kustomize_build() -> list[dict[str, Any]]:
    """``kustomize build deploy/k8s`` for what the base uses: its resources in order,
    with the ``images`` overrides applied."""
    config = kustomization()
    unknown = set(config) - KUSTOMIZE_FIELDS
    assert not unknown, f"kustomization fields the test build does not apply: {unknown}"
    resources: list[dict[str, Any]] = []
    for entry in config["resources"]:
        path = K8S / entry
        assert path.is_file(), f"kustomization.yaml lists {entry}, which does not exist"
        resources.extend(load_documents(path))
    overrides = {image["name"]: image for image in config.get("images", [])}
    for resource in resources:
        for container in pod_containers(resource):
            name, tag = split_image(container["image"])
            override = overrides.get(name)
            if override is not None:
                new_name = override.get("newName", name)
                new_tag = override.get("newTag", tag)
                container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
    return resources


def split_image(image: str) -> tuple[str, str | None]:
    """``name[:tag]`` as (name, tag or None); a registry port is part of the name."""
    if ":" in image.rsplit("/", 1)[-1]:
        name, tag = image.rsplit(":", 1)
        return name, tag
    return image, None


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    if resource["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
        spec: dict[str, Any] = resource["spec"]["template"]["spec"]
        return spec
    return None


def pod_containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(resource)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def find(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and name in (None, r["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def pre_stop_sleep_s(spec: dict[str, Any]) -> float:
    hook = spec.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert command[:1] == ["sleep"] and len(command) == 2, f"preStop: {hook}"
    return float(command[1])
