#!/usr/bin/env python3
"""Run a real single-node Apache Kafka broker (KRaft) from Maven Central jars, without Docker.

Role in phasewatch: this is the one place that knows how to get a genuine Kafka 4.x broker on a
machine that has Java and Maven but no Docker engine and no Kafka tarball. It is used three
ways and must stay stdlib-only so all of them can load it without installing anything:

* the pytest fixture in ``tests/kafka_fixtures.py`` (session broker on random loopback ports,
  restartable to simulate outages);
* CI scripts, via ``python deploy/kafka_local.py fetch`` to warm the jar cache;
* a developer running phasewatch with Kafka on one machine::

      python deploy/kafka_local.py start --port 9092 --create-topic livepeer.task-events:4
      # prints PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 once the broker accepts
      # clients and the topics asked for exist (`make kafka` asks for phasewatch's defaults)

``--override KEY=VALUE`` sets a broker property (e.g. ``auto.create.topics.enable=false``,
as production brokers run); ``LocalKafka(properties=...)`` does the same from Python.

Requirements: ``java`` (17+) and ``mvn`` on PATH, network access to Maven Central on the first
run (jars are cached under ``~/.cache/phasewatch/kafka-<version>/libs``).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import hashlib
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

DEFAULT_VERSION = "4.1.1"
# 2.24.x is what the research notes pinned; any 2.x log4j works with Kafka's slf4j facade.
LOG4J_VERSION = "2.24.3"
# Named in full because Maven 3.8.7's default `dependency:` plugin predates the options we use.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies"
# Written only after a complete copy, so a download interrupted half-way is redone next time.
MARKER_NAME = ".phasewatch-complete"
# Heap the notes and the test budget agree on: enough for tests, modest on a 2-core CI box.
JVM_HEAP = ("-Xms256m", "-Xmx512m")
# Scripts and tests grep for this prefix, and `eval`/`export` can consume the line directly.
BOOTSTRAP_ENV = "PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS"
LOOPBACK = "127.0.0.1"

__all__ = [
    "DEFAULT_VERSION",
    "KafkaJarsError",
    "KafkaStartError",
    "LocalKafka",
    "create_topics",
    "default_cache_dir",
    "ensure_jars",
    "main",
]


class KafkaJarsError(RuntimeError):
    """Maven could not assemble the broker's jars."""


class KafkaStartError(RuntimeError):
    """The broker process exited or did not accept connections in time."""


# --------------------------------------------------------------------------------------------
# Jars
# --------------------------------------------------------------------------------------------


def default_cache_dir(version: str = DEFAULT_VERSION) -> Path:
    """Where ``ensure_jars`` keeps the jars of one Kafka version (honours XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "phasewatch" / f"kafka-{version}" / "libs"


def _pom(version: str, slf4j_binding: str) -> str:
    # kafka_2.13's published POM leaves the logging backend out (the Kafka tarball ships it
    # separately), so without log4j here the broker would log nowhere. The SLF4J binding has
    # to match the slf4j-api major version Kafka pulls in (1.7.x for Kafka 4.0-4.1).
    deps = [
        ("org.apache.kafka", "kafka_2.13", version),
        ("org.apache.logging.log4j", slf4j_binding, LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-api", LOG4J_VERSION),
    ]
    dep_xml = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>local.phasewatch</groupId>\n"
        "  <artifactId>kafka-broker-jars</artifactId>\n"
        "  <version>1</version>\n"
        "  <packaging>pom</packaging>\n"
        "  <dependencies>\n"
        f"{dep_xml}\n"
        "  </dependencies>\n"
        "</project>\n"
    )


def _jars_complete(libs: Path) -> bool:
    return (libs / MARKER_NAME).is_file() and any(libs.glob("*kafka_2.13-*.jar"))


def _copy_dependencies(mvn: str, workdir: Path, out: Path, version: str, binding: str) -> None:
    pom = workdir / "pom.xml"
    pom.write_text(_pom(version, binding), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        mvn, "-B", "-q", "-f", str(pom), DEPENDENCY_PLUGIN,
        # Kafka's own modules (server, raft, metadata...) are runtime-scoped in its POM.
        "-DincludeScope=runtime",
        # Group-prefixed names avoid collisions between same-named artifacts.
        "-Dmdep.prependGroupId=true",
        f"-DoutputDirectory={out}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, cwd=workdir, capture_output=True, text=True, timeout=1200, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaJarsError(f"mvn timed out fetching Kafka {version}") from exc
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()
        raise KafkaJarsError(
            f"mvn failed (exit {proc.returncode}) fetching Kafka {version}:\n"
            + "\n".join(output[-40:])
        )
    if not any(out.glob("*kafka_2.13-*.jar")):
        raise KafkaJarsError(f"mvn succeeded but no kafka_2.13 jar landed in {out}")


def ensure_jars(version: str = DEFAULT_VERSION, cache_dir: Path | None = None) -> Path:
    """Return a directory holding every jar a Kafka ``version`` broker needs, fetching on demand.

    ``cache_dir`` is the jar directory itself (default ``default_cache_dir(version)``). Maven
    is skipped when a previous fetch completed there.
    """
    libs = Path(cache_dir) if cache_dir is not None else default_cache_dir(version)
    if _jars_complete(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaJarsError("`mvn` is not on PATH; it is needed once to fetch the Kafka jars")
    libs.parent.mkdir(parents=True, exist_ok=True)
    # A fetch killed outright (SIGKILL, CI timeout) cannot clean its staging dir; drop ones
    # old enough that no concurrent fetch can still be using them.
    for stale in libs.parent.glob(".fetch-*"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    # Download into a private staging dir next to the target and rename it into place, so
    # concurrent fetches (e.g. pytest-xdist workers) never see or produce a mixed directory.
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=libs.parent) as tmp:
        workdir = Path(tmp)
        staging = workdir / "libs"
        _copy_dependencies(mvn, workdir, staging, version, "log4j-slf4j-impl")
        if any(staging.glob("org.slf4j.slf4j-api-2.*.jar")):
            # A Kafka that moved to SLF4J 2 ignores the 1.7 binding and would log nothing.
            _copy_dependencies(mvn, workdir, staging, version, "log4j-slf4j2-impl")
        jar_names = sorted(p.name for p in staging.glob("*.jar"))
        (staging / MARKER_NAME).write_text("\n".join(jar_names) + "\n", encoding="utf-8")
        if libs.exists() and not _jars_complete(libs):
            shutil.rmtree(libs)  # leftover of an interrupted run from before staging existed
        try:
            staging.rename(libs)
        except OSError:
            if not _jars_complete(libs):  # not a concurrent fetch winning the race: real error
                raise
    return libs


# --------------------------------------------------------------------------------------------
# Broker
# --------------------------------------------------------------------------------------------

# Track live brokers so an interpreter that exits without close() does not orphan a JVM.
_LIVE: set[LocalKafka] = set()


@atexit.register
def _reap_live_brokers() -> None:
    for broker in list(_LIVE):
        broker.stop(timeout=10)


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; True if the process went down gracefully."""
    if proc.poll() is not None:
        return True
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return True


def _free_ports(count: int) -> list[int]:
    # Hold every socket open until all are bound so the OS cannot hand out the same port twice.
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _accepting(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cluster_id() -> str:
    # Kafka cluster ids are 16 random bytes, URL-safe base64 without padding. A leading '-'
    # would be parsed as an option by the storage tool, so draw again in that case.
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):
            return cid


def _prop(value: str | Path) -> str:
    # Backslash is the escape character in .properties files.
    return str(value).replace("\\", "\\\\")


def _load_prctl() -> Callable[..., int] | None:
    # Resolved once in the parent: calling dlopen() in a forked child of a multi-threaded
    # process can deadlock, so the child only calls an already-resolved function.
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> None:
    # Ask Linux to SIGKILL the JVM if the process that started it dies (e.g. pytest killed by
    # a CI timeout), so no broker outlives its owner.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class LocalKafka:
    """One combined broker+controller KRaft node on loopback, owned by this Python process.

    Ports are chosen once, in the constructor, and kept for the object's lifetime so that
    ``restart()`` brings the broker back where clients expect it, with the same data.
    """

    def __init__(
        self,
        version: str = DEFAULT_VERSION,
        port: int = 0,
        controller_port: int = 0,
        data_dir: Path | str | None = None,
        log_path: Path | str | None = None,
        *,
        cache_dir: Path | None = None,
        java: str = "java",
        class_data_sharing: bool = True,
        properties: Mapping[str, str] | None = None,
    ) -> None:
        self.version = version
        # Broker properties over (or besides) the defaults of _write_config.
        self.properties = dict(properties or {})
        self.cache_dir = cache_dir
        self.java = java
        self.class_data_sharing = class_data_sharing
        wanted = [p for p in (port, controller_port) if p]
        picked = iter(_free_ports(2 - len(wanted)))
        self.port: int = port or next(picked)
        self.controller_port: int = controller_port or next(picked)
        if self.port == self.controller_port:
            raise ValueError("port and controller_port must differ")
        self._owns_data_dir = data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="phasewatch-kafka-"))
            if data_dir is None
            else Path(data_dir).resolve()
        )
        self.log_path = (
            Path(log_path).resolve() if log_path is not None else self.data_dir / "broker.log"
        )
        self._proc: subprocess.Popen[bytes] | None = None
        # (temporary dump path, final archive path) while this JVM writes a CDS archive.
        self._cds_dump: tuple[Path, Path] | None = None
        self._closed = False

    # -- public API -----------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = 90) -> str:
        """Start the broker (formatting storage the first time) and wait until it serves.

        Returns the bootstrap address. Idempotent while the broker is running. ``timeout``
        covers the JVM start only; a cold jar download happens before it and is not counted.
        """
        if self._closed:
            raise RuntimeError("LocalKafka is closed")
        if self.running:
            return self.bootstrap_servers
        libs = ensure_jars(self.version, self.cache_dir)
        for p in (self.port, self.controller_port):
            # A readiness check by TCP connect would be fooled by a foreign listener.
            if _accepting(p, timeout=0.2):
                raise KafkaStartError(f"{LOOPBACK}:{p} is already in use by another process")
        self._write_config()
        classpath = str(libs / "*")  # unexpanded: java expands the wildcard itself
        if not (self._log_dir / "meta.properties").exists():
            archive = self._cds_archive(libs)
            # Reuse the broker's archive when there is one (2.0 s -> 1.3 s); never dump here.
            self._format(classpath, archive if archive is not None and archive.is_file() else None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        cmd = [
            self.java, *JVM_HEAP, *self._cds_flags(libs),
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._log4j_path}",
            "-cp", classpath, "kafka.Kafka", str(self._server_properties),
        ]  # fmt: skip
        # JVM-level failures (bad flags, crashes) print to stdout/stderr before log4j is up;
        # sending both to the broker log puts them in the error message's tail.
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Own session: a Ctrl-C meant for the CLI or pytest must not race our orderly
                # stop(); the owner decides when the broker goes down.
                start_new_session=True,
                # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only arm it
                # from the main thread; from a worker thread it would kill a healthy broker. The
                # hook only calls a pre-resolved libc function, which is fork-safe.
                preexec_fn=(  # noqa: PLW1509
                    _pdeathsig_preexec
                    if _PRCTL is not None and threading.current_thread() is threading.main_thread()
                    else None
                ),
            )
        _LIVE.add(self)
        self._wait_ready(timeout, log_offset)
        return self.bootstrap_servers

    def create_topics(
        self, topics: Iterable[tuple[str, int]], timeout: float = 30
    ) -> dict[str, bool]:
        """Create ``(name, partitions)`` topics, replication factor 1 (:func:`create_topics`)."""
        if not self.running:
            raise RuntimeError("the broker is not running")
        return create_topics(self.port, topics, timeout)

    def stop(self, timeout: float = 30) -> None:
        """Clean shutdown (SIGTERM), escalating to SIGKILL after ``timeout`` seconds."""
        if self._proc is not None:
            graceful = _terminate(self._proc, timeout)
            self._proc = None
            self._finish_cds_dump(keep=graceful)
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the broker: an abrupt crash, for outage tests. ``start()`` recovers it."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
            self._finish_cds_dump(keep=False)
        _LIVE.discard(self)

    def restart(self, timeout: float = 90) -> str:
        """Stop and start again on the same ports and data (no re-format)."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the broker and delete the data dir if this object created it."""
        self.stop()
        self._closed = True
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalKafka({self.version!r}, {self.bootstrap_servers}, {state}, {self.data_dir})"

    # -- internals ------------------------------------------------------------------------

    @property
    def _log_dir(self) -> Path:
        return self.data_dir / "kraft"

    @property
    def _server_properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def _log4j_path(self) -> Path:
        return self.data_dir / "log4j2.properties"

    def _cds_flags(self, libs: Path) -> list[str]:
        # Class-data sharing: a JVM that maps an archive of Kafka's and Scala's already-parsed
        # classes starts the broker in ~1.5 s instead of ~4 s (measured on 2 cores), which is
        # most of the cost of every restart in outage tests. The first broker dumps the
        # archive when it exits cleanly; later ones use it. The JVM validates the archive
        # against the JDK and classpath and silently runs without it on any mismatch, and the
        # name is keyed on the java binary so a JDK upgrade dumps a fresh one.
        self._cds_dump = None
        archive = self._cds_archive(libs)
        if archive is None:
            return []
        if archive.is_file():
            return [f"-XX:SharedArchiveFile={archive}"]
        # Dump to a private name and rename once complete: concurrent brokers (xdist workers)
        # must never map a half-written archive.
        tmp = archive.with_name(f".{archive.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self._cds_dump = (tmp, archive)
        return [f"-XX:ArchiveClassesAtExit={tmp}"]

    def _cds_archive(self, libs: Path) -> Path | None:
        if not self.class_data_sharing:
            return None
        exe = shutil.which(self.java)
        if exe is None:
            return None  # let Popen report the missing java
        real = Path(exe).resolve()
        st = real.stat()
        tag = hashlib.sha256(f"{real}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return libs / f"cds-{tag}.jsa"  # not a *.jar, so the classpath wildcard ignores it

    def _finish_cds_dump(self, *, keep: bool) -> None:
        if self._cds_dump is None:
            return
        tmp, archive = self._cds_dump
        self._cds_dump = None
        # The JVM writes the archive during a normal exit; after SIGKILL it may be partial.
        if keep and tmp.is_file() and tmp.stat().st_size > 0:
            with contextlib.suppress(OSError):
                tmp.replace(archive)
        with contextlib.suppress(OSError):
            tmp.unlink()

    def _write_config(self) -> None:
        # Rewritten on every start (cheap) so a persistent --data-dir follows the current
        # ports; with a static voter set the controller port is plain configuration.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://{LOOPBACK}:{self.port},CONTROLLER://{LOOPBACK}:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": _prop(self._log_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            # Single node: every internal topic must accept replication factor 1, and one
            # partition each makes the group/txn coordinators come up quickly.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Tests join consumer groups constantly; the default 3 s delay is pure waiting.
            "group.initial.rebalance.delay.ms": "0",
            # After a SIGKILL the restarted controller refuses the new broker incarnation until
            # the old one's session expires: 9 s by default, 3 s here (measured 12.4 s -> 5.5 s).
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            # 2 cores in CI: the defaults (3 network, 8 io threads) only add contention.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            # Smaller segments keep a long-lived dev data dir compact; retention stays default.
            "log.segment.bytes": str(16 * 1024 * 1024),
        }
        props.update({key: _prop(value) for key, value in self.properties.items()})
        self._server_properties.write_text(
            "".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8"
        )
        # Quiet on purpose: WARN and up, plus KafkaRaftServer's INFO lines ("Kafka Server
        # started", "shut down completed") so the log shows the lifecycle. The shutdown hook
        # is off because Kafka logs during JVM shutdown and log4j would complain on stdout;
        # the File appender flushes every line, so nothing is lost.
        log4j = f"""\
status = warn
shutdownHook = disable
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {_prop(self.log_path)}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.lifecycle.name = kafka.server.KafkaRaftServer
logger.lifecycle.level = INFO
"""
        self._log4j_path.write_text(log4j, encoding="utf-8")

    def _format(self, classpath: str, cds_archive: Path | None) -> None:
        # Static voters (controller.quorum.voters), so no --standalone.
        cds = [f"-XX:SharedArchiveFile={cds_archive}"] if cds_archive is not None else []
        cmd = [
            self.java, "-Xmx256m", *cds, f"-Dlog4j2.configurationFile={self._log4j_path}",
            "-cp", classpath, "kafka.tools.StorageTool", "format",
            "-t", _cluster_id(), "-c", str(self._server_properties),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise KafkaStartError(
                f"kafka-storage format failed (exit {proc.returncode}):\n"
                + (proc.stdout + proc.stderr).strip()
            )

    def _wait_ready(self, timeout: float, log_offset: int) -> None:
        # The broker opens its client listener only once it can serve requests (measured: the
        # same instant as "Kafka Server started"), so a TCP connect is the readiness signal.
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                self._finish_cds_dump(keep=False)
                _LIVE.discard(self)
                raise KafkaStartError(
                    f"Kafka broker exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self._log_since(log_offset)}"
                )
            if _accepting(self.port):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise KafkaStartError(
                    f"Kafka broker did not accept connections on {self.bootstrap_servers} "
                    f"within {timeout:.0f}s; log {self.log_path}:\n{self._log_since(log_offset)}"
                )
            time.sleep(0.05)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-40:]) or self.log_tail()


# --------------------------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------------------------

# CreateTopics (API key 19) v2: spoken by every broker since Kafka 1.0 and still by 4.x (which
# dropped v0-v1). Stdlib-only, so this module runs without a Kafka client library; the jars
# hold no topic CLI (kafka-tools is not a dependency of the broker).
_CREATE_TOPICS = 19
_CREATE_TOPICS_VERSION = 2
_TOPIC_ALREADY_EXISTS = 36
# A broker that has just opened its listener may not be registered with its controller yet
# (INVALID_REPLICATION_FACTOR: "0 available brokers"), nor have a controller at hand.
_RETRIABLE = {
    5: "LEADER_NOT_AVAILABLE",
    7: "REQUEST_TIMED_OUT",
    8: "BROKER_NOT_AVAILABLE",
    38: "INVALID_REPLICATION_FACTOR",
    41: "NOT_CONTROLLER",
    89: "THROTTLING_QUOTA_EXCEEDED",
}


def _kafka_string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">h", len(raw)) + raw


def _create_topics_request(
    correlation_id: int, topics: list[tuple[str, int]], timeout_ms: int
) -> bytes:
    body = struct.pack(">i", len(topics))
    for name, partitions in topics:
        # partitions, replication factor 1, no manual assignment, no topic configs
        body += _kafka_string(name) + struct.pack(">ihii", partitions, 1, 0, 0)
    body += struct.pack(">ib", timeout_ms, 0)  # validate_only = false
    header = struct.pack(">hhi", _CREATE_TOPICS, _CREATE_TOPICS_VERSION, correlation_id)
    message = header + _kafka_string("phasewatch-kafka-local") + body
    return struct.pack(">i", len(message)) + message


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> tuple[int, ...]:
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return values

    def string(self) -> str | None:
        (length,) = self.take(">h")
        if length < 0:
            return None
        value = self.data[self.at : self.at + length].decode("utf-8", "replace")
        self.at += length
        return value


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        chunks += chunk
    return bytes(chunks)


def _create_topics_once(
    port: int, topics: list[tuple[str, int]], timeout: float
) -> dict[str, tuple[int, str | None]]:
    """One CreateTopics round trip: name -> (error code, error message)."""
    correlation_id = secrets.randbits(31)
    with socket.create_connection((LOOPBACK, port), timeout=timeout + 5) as sock:
        sock.sendall(_create_topics_request(correlation_id, topics, int(timeout * 1000)))
        (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
        reader = _Reader(_recv_exactly(sock, size))
    got_id, _throttle_ms, count = reader.take(">iii")
    if got_id != correlation_id:
        raise ConnectionError(f"CreateTopics answer for request {got_id}, not {correlation_id}")
    results: dict[str, tuple[int, str | None]] = {}
    for _ in range(count):
        name = reader.string() or ""
        (code,) = reader.take(">h")
        results[name] = (code, reader.string())
    return results


def create_topics(
    port: int, topics: Iterable[tuple[str, int]], timeout: float = 30
) -> dict[str, bool]:
    """Create ``(name, partitions)`` topics (replication factor 1) on the broker at
    ``127.0.0.1:port``; name -> True if created, False if it existed already. Retries what
    a broker still starting answers, up to ``timeout``; any other error raises
    :class:`KafkaStartError` naming the topic."""
    wanted = dict(topics)
    for name, partitions in wanted.items():
        if partitions < 1:
            raise ValueError(f"topic {name!r}: partitions must be at least 1, not {partitions}")
    done: dict[str, bool] = {}
    deadline = time.monotonic() + timeout
    while True:
        pending = [(name, n) for name, n in wanted.items() if name not in done]
        if not pending:
            return {name: done[name] for name in wanted}
        try:
            # The broker waits up to the request's timeout for the topic to be created.
            wait = min(10.0, max(1.0, deadline - time.monotonic()))
            results = _create_topics_once(port, pending, wait)
            last = ", ".join(
                f"{n}: error {c} {_RETRIABLE.get(c, '')} {m or ''}".strip()
                for n, (c, m) in results.items()
                if c
            )
        except (OSError, struct.error) as exc:
            results, last = {}, f"{type(exc).__name__}: {exc}"
        for name, (code, message) in results.items():
            if code in (0, _TOPIC_ALREADY_EXISTS):
                done[name] = code == 0
            elif code not in _RETRIABLE:
                raise KafkaStartError(
                    f"creating topic {name!r} failed: error {code} {message or ''}".rstrip()
                )
        if time.monotonic() >= deadline and len(done) < len(wanted):
            raise KafkaStartError(f"creating topics timed out after {timeout:g}s ({last})")
        if len(done) < len(wanted):
            time.sleep(0.2)


def _topic_spec(value: str) -> tuple[str, int]:
    """``NAME[:PARTITIONS]`` (topic names cannot hold a colon); one partition by default."""
    name, sep, count = value.rpartition(":")
    if not sep:
        name, count = value, "1"
    try:
        partitions = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME[:PARTITIONS]") from None
    if not name or partitions < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME[:PARTITIONS], PARTITIONS >= 1")
    return name, partitions


def _override(value: str) -> tuple[str, str]:
    key, sep, setting = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: expected KEY=VALUE")
    return key.strip(), setting.strip()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _cmd_fetch(args: argparse.Namespace) -> int:
    libs = ensure_jars(args.version, args.cache_dir)
    print(libs)
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _on_signal)

    broker = LocalKafka(
        args.version,
        port=args.port,
        controller_port=args.controller_port,
        data_dir=args.data_dir,
        log_path=args.log,
        cache_dir=args.cache_dir,
        class_data_sharing=not args.no_cds,
        properties=dict(args.override),
    )
    try:
        t0 = time.monotonic()
        broker.start(timeout=args.timeout)
        # Before the address is printed: whoever waits for it finds the topics there.
        created = broker.create_topics(args.create_topic, timeout=args.timeout)
        for name, partitions in args.create_topic:
            plural = "s" if partitions > 1 else ""
            how = f"created, {partitions} partition{plural}" if created[name] else "exists already"
            print(f"topic {name}: {how}", file=sys.stderr, flush=True)
        print(f"{BOOTSTRAP_ENV}={broker.bootstrap_servers}", flush=True)
        print(
            f"Kafka {args.version} ready in {time.monotonic() - t0:.1f}s; data {broker.data_dir},"
            f" log {broker.log_path}. Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        while not stop_requested.wait(0.5):
            if not broker.running:
                print(f"Kafka broker died:\n{broker.log_tail()}", file=sys.stderr)
                return 1
        print("Stopping Kafka...", file=sys.stderr, flush=True)
        return 0
    except (KafkaJarsError, KafkaStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kafka_local.py",
        description="Fetch and run a single-node Apache Kafka (KRaft) broker from Maven jars.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--version", default=DEFAULT_VERSION, help="Kafka version (4.x)")
        p.add_argument(
            "--cache-dir", type=Path, default=None, help="jar directory (default ~/.cache/...)"
        )

    fetch = sub.add_parser("fetch", help="only download the broker jars into the cache")
    common(fetch)
    fetch.set_defaults(func=_cmd_fetch)

    start = sub.add_parser("start", help="run a broker in the foreground until Ctrl-C/SIGTERM")
    common(start)
    start.add_argument("--port", type=int, default=9092, help="client port (0 = pick a free one)")
    start.add_argument("--controller-port", type=int, default=0, help="0 = pick a free one")
    start.add_argument(
        "--data-dir", type=Path, default=None, help="persistent data dir (default: temp, deleted)"
    )
    start.add_argument("--log", type=Path, default=None, help="broker log (default: in data dir)")
    start.add_argument("--timeout", type=float, default=90, help="seconds to wait for start-up")
    start.add_argument(
        "--no-cds", action="store_true", help="do not use/create a JVM class-data-sharing archive"
    )
    start.add_argument(
        "--create-topic",
        type=_topic_spec,
        action="append",
        default=[],
        metavar="NAME[:PARTITIONS]",
        help="create this topic once the broker is up (repeatable; 1 partition by default;"
        " one that exists is left as it is)",
    )
    start.add_argument(
        "--override",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a broker property, e.g. auto.create.topics.enable=false (repeatable)",
    )
    start.set_defaults(func=_cmd_start)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
