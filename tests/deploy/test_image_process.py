"""What the image runs, run here as a process: the Dockerfile's ENTRYPOINT/CMD with its
ENV (both parsed from deploy/Dockerfile), on a free port and a SQLite file in tmp_path,
after the migration Job's command, with PHASEWATCH_DATABASE_MIGRATE as the ConfigMap
sets it. Probed on /healthz and /readyz, by the HEALTHCHECK's own one-liner too, then
stopped with SIGTERM within the grace period the manifests give it.

The image itself is not built: there is no Docker engine in CI."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.deploy.support import (
    COMPOSE,
    VENV_BIN,
    duration_s,
    exec_form,
    find,
    healthcheck_options,
    image_command,
    kustomize_build,
    load_yaml,
    parse_dockerfile,
    pod_containers,
    pre_stop_sleep_s,
)

pytestmark = pytest.mark.slow  # spawns processes

# In the image the venv is at /opt/venv; here it is the one running the tests.
IMAGE_VENV_BIN = "/opt/venv/bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def image_environment(tmp_path: Path, port: int) -> dict[str, str]:
    """The container's environment: the image's ENV lines over a bare one (nothing of
    ours leaks in, no PHASEWATCH_* of the CI machine), with this venv for /opt/venv.
    Overridden, as compose and the manifests do: the database (SQLite in tmp_path, not
    PostgreSQL), the port (a free one) and the host. The image binds 0.0.0.0 (checked in
    test_dockerfile); a test on a shared machine listens on loopback only."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    for key, value in parse_dockerfile()[-1].env().items():
        expanded = value.replace("$PATH", env["PATH"]).replace("${PATH}", env["PATH"])
        env[key] = expanded.replace(IMAGE_VENV_BIN, str(VENV_BIN))
    assert env["PATH"].startswith(str(VENV_BIN)), "the image puts its venv first on PATH"
    env["PHASEWATCH_DATABASE_URL"] = f"sqlite:///{tmp_path / 'phasewatch.db'}"
    env["PHASEWATCH_HTTP_PORT"] = str(port)
    env["PHASEWATCH_HTTP_HOST"] = "127.0.0.1"
    return env


def resolve(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """argv[0] looked up on the container's PATH, as the runtime does for exec form."""
    found = shutil.which(argv[0], path=env["PATH"])
    assert found, f"{argv[0]} is not on the image's PATH"
    return [found, *argv[1:]]


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()}"
        status = get(url)
        if status == 200:
            return status
        time.sleep(0.1)
    raise AssertionError(f"{url} answered {status} for {timeout:g} s:\n{log.read_text()}")


def grace_after_sigterm_s() -> float:
    """The least time an orchestrator gives after SIGTERM: Kubernetes' grace period less
    the preStop sleep (it counts against the grace), and compose's stop_grace_period."""
    deployment = find(kustomize_build(), "Deployment")
    sleep = pre_stop_sleep_s(pod_containers(deployment)[0])
    grace = float(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    compose = load_yaml(COMPOSE)["services"]
    periods = [
        duration_s(s["stop_grace_period"]) for s in compose.values() if "stop_grace_period" in s
    ]
    return min([grace - sleep, *periods])


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    port = free_port()
    env = image_environment(tmp_path, port)
    config = find(kustomize_build(), "ConfigMap")["data"]

    # The migration Job first (its command, from the manifest), as the replicas expect.
    job = pod_containers(find(kustomize_build(), "Job"))[0]
    migrate = resolve(job["command"] + job.get("args", []), env)
    done = subprocess.run(
        migrate, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "applied schema" in done.stdout, done.stdout

    env["PHASEWATCH_DATABASE_MIGRATE"] = config["PHASEWATCH_DATABASE_MIGRATE"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            resolve(image_command(), env),
            env=env,
            cwd=tmp_path,  # the image's WORKDIR is its own: no .env of the repository
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, env, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_the_image_command_serves_probes_and_stops_on_sigterm(
    service: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    proc, env, log = service
    base = f"http://127.0.0.1:{env['PHASEWATCH_HTTP_PORT']}"
    startup = find(kustomize_build(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    startup_s = (
        startup["startupProbe"]["periodSeconds"] * startup["startupProbe"]["failureThreshold"]
    )
    wait_for(f"{base}/healthz", proc, log, timeout=startup_s)
    assert get(f"{base}/readyz") == 200, log.read_text()

    # Docker's HEALTHCHECK, as the image declares it, against the running process.
    check = parse_dockerfile()[-1].last("HEALTHCHECK")
    assert check is not None
    timeout = duration_s(healthcheck_options(check)["timeout"])
    probe = resolve(exec_form(check), env)
    healthy = subprocess.run(
        probe, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert healthy.returncode == 0, healthy.stderr

    grace = grace_after_sigterm_s()
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"still running {grace:g} s after SIGTERM:\n{log.read_text()}"
        ) from None
    took = time.monotonic() - started
    assert code == 0, f"exit {code} after SIGTERM:\n{log.read_text()}"
    assert took < grace
    assert "Traceback" not in log.read_text()

    # And the healthcheck fails once nothing answers (it is not a no-op).
    dead = subprocess.run(
        probe, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert dead.returncode != 0


def test_before_the_migration_the_image_command_refuses_in_one_line(tmp_path: Path) -> None:
    """What a replica does when it starts before the migration Job has run (the
    ConfigMap turns migrations off): one line naming the fix, exit 2, no traceback; the
    orchestrator restarts it until the schema is there."""
    env = image_environment(tmp_path, free_port())
    config = find(kustomize_build(), "ConfigMap")["data"]
    env["PHASEWATCH_DATABASE_MIGRATE"] = config["PHASEWATCH_DATABASE_MIGRATE"]
    done = subprocess.run(
        resolve(image_command(), env),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "phasewatch migrate" in done.stderr
    assert "Traceback" not in done.stderr
