"""End-to-end webhook benchmark: phasewatch vs a bare HMAC-checking receiver.

Both servers are driven by the same C load generator (wrk, with ``bench/wrk_replay.lua``
replaying pre-signed deliveries) with the same settings, in one run, for several rounds
whose order alternates (bare first, then phasewatch first, ...). Every server run gets a
fresh process and a fresh store (a new SQLite file for phasewatch, a new out-file for
the bare receiver), and replays the same window of the deliveries file from its first
line: each delivery is new to the server, and both servers see the identical request
sequence. Everything listens on 127.0.0.1 only.

A run counts only if wrk saw no socket error, no timeout and no non-2xx response, did not
run out of deliveries (no repeats), and the server-side check passes:

* bare receiver: the out-file holds at least as many bodies as wrk got 204s;
* phasewatch: ``GET /tasks?limit=1`` answers 200, and if the SQLite file has an events
  table, it holds at least the distinct event ids that were acknowledged (fewer would
  mean a 2xx before commit) and at most those that were sent.

With ``--postgres`` (a local server from the machine's binaries, started once for the
run; ``--database-url ADMIN_URL`` uses an existing one), PostgreSQL contenders join the
same rounds: ``postgres`` (one replica) and, with ``--replicas 1,2``, ``postgres-x2``: two
``phasewatch serve`` processes on two ports sharing one database, driven by two wrk
instances at once, each with half the connections and its own half of the deliveries
(requests/s summed; latency the worse of the two). Every PostgreSQL run gets a fresh
database; the check reads its ``events`` table and ``counters`` row.

Results: a table on stdout and ``bench/results/webhook.json``. Goals, median of per-round
ratios to the bare receiver's events/s: SQLite (``phasewatch``) at least 0.5x, PostgreSQL
at least 0.4x.

    .venv/bin/python bench/webhook_bench.py                 # 3 rounds, -t1 -c32 -d15s
    .venv/bin/python bench/webhook_bench.py --only bare --rounds 1
    .venv/bin/python bench/webhook_bench.py --postgres --replicas 1,2   # + PostgreSQL
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gen_deliveries
from pg_local import BenchPostgres, bench_postgres, code_state

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LUA = BENCH / "wrk_replay.lua"
VENV_PY = REPO / ".venv" / "bin" / "python"
PHASEWATCH_BIN = REPO / ".venv" / "bin" / "phasewatch"
HOST = "127.0.0.1"
GOAL_RATIO = 0.5
PG_GOAL_RATIO = 0.4
SERVERS = ("bare", "phasewatch")  # the default contenders; see contenders_for()


def replicas_of(name: str) -> int:
    """postgres -> 1, postgres-x2 -> 2; everything else runs one process."""
    m = re.fullmatch(r"postgres-x(\d+)", name)
    return int(m.group(1)) if m else 1


def is_postgres(name: str) -> bool:
    return name == "postgres" or name.startswith("postgres-x")


def goal_for(name: str) -> float:
    return PG_GOAL_RATIO if is_postgres(name) else GOAL_RATIO


def pg_name(replicas: int) -> str:
    return "postgres" if replicas == 1 else f"postgres-x{replicas}"


DEFAULT_DELIVERIES = 300_000  # ~20k/s for 15 s on one thread before a repeat


@dataclass(frozen=True)
class Config:
    rounds: int
    duration: int
    connections: int
    threads: int
    timeout: int
    deliveries: int
    seed: int
    secret: str
    only: str | None
    phasewatch_cmd: list[str]
    ready_timeout: float
    keep: bool
    out_json: Path
    contenders: tuple[str, ...] = SERVERS
    pg_admin_url: str | None = None  # None with a postgres contender: start a local server
    pg_settings: tuple[str, ...] = ()  # NAME=VALUE: ALTER DATABASE ... SET on each database

    def wrk_args(self, connections: int | None = None) -> list[str]:
        return [
            f"-t{self.threads}",
            f"-c{connections or self.connections}",
            f"-d{self.duration}s",
            f"--timeout={self.timeout}s",
        ]


@dataclass
class RunResult:
    server: str
    round: int
    order: int
    valid: bool = False
    rps: float | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wrk: dict[str, Any] = field(default_factory=dict)
    threads: list[dict[str, int]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    server_check: dict[str, Any] = field(default_factory=dict)
    startup_s: float | None = None
    log: str = ""


# ---------------------------------------------------------------- preparation


def ensure_wrk(install: bool) -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if not install:
        raise SystemExit(
            "wrk not found. Install it (Debian): apt-get install -y wrk\n"
            "or rerun as root with --install-wrk"
        )
    if os.geteuid() != 0:
        raise SystemExit("--install-wrk needs root; run: sudo apt-get install -y wrk")
    print("installing wrk with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, check=False).returncode:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], env=env, check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("apt-get install wrk did not provide a wrk binary")
    return found


def ensure_deliveries(cfg: Config) -> tuple[Path, dict[str, Any]]:
    """The tsv deliveries file for cfg, generated into bench/results/ unless it exists."""
    path = RESULTS / f"deliveries-{cfg.deliveries}-seed{cfg.seed}.tsv"
    params = gen_deliveries.Params(n=cfg.deliveries, secret=cfg.secret, seed=cfg.seed)
    wanted = gen_deliveries.build_meta(gen_deliveries.DEFAULT_TEMPLATE, params, "tsv")
    meta_file = gen_deliveries.meta_path(path)
    if path.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if {k: meta.get(k) for k in wanted} == wanted:
            return path, meta
    print(f"generating {cfg.deliveries} deliveries into {path} ...", file=sys.stderr)
    t0 = time.monotonic()
    gen_deliveries.main(
        [
            "-q",
            "-n",
            str(cfg.deliveries),
            "--seed",
            str(cfg.seed),
            "--secret",
            cfg.secret,
            "--tsv",
            str(path),
        ]
    )
    print(f"  done in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    # Smoke check: the first deliveries verify with the secret and follow the template.
    gen_deliveries.check(
        path, gen_deliveries.load_template(gen_deliveries.DEFAULT_TEMPLATE), params, 5000
    )
    return path, json.loads(meta_file.read_text(encoding="utf-8"))


_ID_PREFIX = re.compile(r'\{"id":"([^"\\]*)"')


class DeliveryIndex:
    """Event and task id of every line of the deliveries file (for plausibility checks)."""

    def __init__(self, path: Path) -> None:
        self.event_ids: list[str] = []
        self.task_ids: list[str | None] = []
        for _sig, raw in gen_deliveries.read_deliveries(path):
            m = _ID_PREFIX.match(raw)
            self.event_ids.append(m.group(1) if m else str(json.loads(raw)["id"]))
            self.task_ids.append(_task_id_fast(raw))

    def distinct(self, ranges: list[tuple[int, int]], tasks: bool = False) -> int:
        ids = self.task_ids if tasks else self.event_ids
        seen: set[str | None] = set()
        for start, stop in ranges:
            seen.update(ids[start:stop])
        seen.discard(None)
        return len(seen)


_TASK_ID = re.compile(r'"payload":\{"task":\{"id":"([^"\\]*)"')


def _task_id_fast(raw: str) -> str | None:
    m = _TASK_ID.search(raw)
    return m.group(1) if m else None


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    """A server subprocess on 127.0.0.1:<port> with its own scratch directory."""

    def __init__(self, name: str, cfg: Config, tag: str, db_url: str | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.db_url = db_url  # a PostgreSQL database; None: a fresh SQLite file
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"pwbench-{name}-"))
        RESULTS.joinpath("runs").mkdir(parents=True, exist_ok=True)
        self.log_path = RESULTS / "runs" / f"{tag}-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def db_path(self) -> Path:
        return self.tmp / "bench.db"

    @property
    def out_file(self) -> Path:
        return self.tmp / "bodies.log"

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if self.name == "bare":
            py = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))
            cmd = [
                py,
                str(BENCH / "bare_receiver.py"),
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--secret",
                self.cfg.secret,
                "--out-file",
                str(self.out_file),
            ]
            return cmd, env
        env.update(
            PHASEWATCH_DATABASE_URL=self.db_url or f"sqlite:///{self.db_path}",
            PHASEWATCH_HTTP_HOST=HOST,
            PHASEWATCH_HTTP_PORT=str(self.port),
            PHASEWATCH_WEBHOOK_SECRET=self.cfg.secret,
            PHASEWATCH_WEBHOOK_TOLERANCE_S="0",
        )
        return list(self.cfg.phasewatch_cmd), env

    def start(self) -> float:
        """Start and wait for GET /healthz == 200; return the startup time in seconds."""
        cmd, env = self.command()
        log = self.log_path.open("wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = t0 + self.cfg.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(OSError):
                if http_get(f"{self.base}/healthz", timeout=1.0)[0] == 200:
                    return time.monotonic() - t0
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.name} not ready after {self.cfg.ready_timeout}s:\n" + self.log_tail()
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        if not self.cfg.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- wrk


_KV = re.compile(r"(\w+)=(\S+)")


def _num(value: str) -> int | float | str:
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def run_wrk(wrk: str, cfg: Config, url: str, deliveries: Path, result: RunResult) -> str:
    return run_wrks(wrk, cfg, [url], deliveries, result)


def run_wrks(wrk: str, cfg: Config, urls: list[str], deliveries: Path, result: RunResult) -> str:
    """One wrk per URL, all at once: the connections and the deliveries window split
    evenly between them (disjoint slices); their summaries merged into ``result``."""
    n = len(urls)
    if cfg.connections < n * cfg.threads:
        result.problems.append(f"--connections {cfg.connections} < {n} wrk x {cfg.threads}")
        return ""
    procs = []
    for i, url in enumerate(urls):
        lo, hi = i * cfg.deliveries // n, (i + 1) * cfg.deliveries // n
        conns = (i + 1) * cfg.connections // n - i * cfg.connections // n
        env = {
            **os.environ,
            "PHASEWATCH_BENCH_DELIVERIES": str(deliveries),
            "PHASEWATCH_BENCH_THREADS": str(cfg.threads),
            "PHASEWATCH_BENCH_OFFSET": str(lo),
            "PHASEWATCH_BENCH_COUNT": str(hi - lo),
        }
        cmd = [wrk, *cfg.wrk_args(conns), "-s", str(LUA), url]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = []
    deadline = time.monotonic() + cfg.duration + 120
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            result.problems.append(f"wrk did not finish within {cfg.duration + 120}s")
        if proc.returncode != 0:
            result.problems.append(f"wrk exited with {proc.returncode}")
        outs.append(out)
    summaries = []
    for out in outs:
        summary = parse_wrk(out, result)
        if summary:
            summaries.append(summary)
    if len(summaries) == n:
        result.wrk = merge_wrk(summaries)
    return "\n".join(outs)


_SUMMED = ("requests", "bytes", "sent", "responses", "loaded", "wraps", "threads", "rps")
_SUMMED_ERR = ("connect_errors", "read_errors", "write_errors", "timeout_errors", "status_errors")


def merge_wrk(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Several wrk instances' PWBENCH summaries as one: counts and rates summed,
    latencies the worst instance's (a conservative p50/p99), duration the longest."""
    if len(summaries) == 1:
        return summaries[0]
    merged: dict[str, Any] = {}
    for key in summaries[0]:
        values = [s.get(key, 0) for s in summaries]
        if key in _SUMMED or key in _SUMMED_ERR:
            merged[key] = sum(values)
        elif key == "non2xx":
            merged[key] = (
                sum(int(v) for v in values) if all(v != "unknown" for v in values) else "unknown"
            )
        else:
            merged[key] = max(values)
    merged["instances"] = len(summaries)
    merged["per_instance_rps"] = [s.get("rps") for s in summaries]
    return merged


def parse_wrk(out: str, result: RunResult) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        fields = {k: _num(v) for k, v in _KV.findall(rest)}
        if kind == "PWBENCH":
            summary = fields
        elif kind == "PWBENCH_THREAD":
            result.threads.append({k: int(v) for k, v in fields.items()})
        elif kind == "PWBENCH_STATUS":
            code = str(fields["code"])
            result.statuses[code] = result.statuses.get(code, 0) + int(fields["count"])
        elif kind == "PWBENCH_ERROR":
            result.problems.append(rest)
    return summary


def judge_wrk(result: RunResult, cfg: Config) -> None:
    w = result.wrk
    if not w:
        result.problems.append("no PWBENCH summary from wrk_replay.lua")
        return
    sock = {k: w[f"{k}_errors"] for k in ("connect", "read", "write", "timeout")}
    if any(sock.values()):
        result.problems.append(f"socket errors {sock}")
    if w["status_errors"] or w["non2xx"] not in (0, "0"):
        result.problems.append(
            f"non-2xx responses: {w['non2xx']} (>399: {w['status_errors']}) {result.statuses}"
        )
    if w["wraps"]:
        result.problems.append(
            f"ran out of deliveries ({w['wraps']} wraps): raise --deliveries above "
            f"{int(w['rps'] * cfg.duration * 1.3)}"
        )
    if w["requests"] == 0:
        result.problems.append("no request completed")
    if cfg.threads > 1:
        late = sum(t.get("load_ms", 0) for t in result.threads if t.get("id", 0) > 0)
        result.warnings.append(
            f"-t{cfg.threads}: wrk runs init() of threads 1..{cfg.threads - 1} ({late} ms of "
            "loading) after thread 0 started sending, so req/s is inflated by up to "
            f"{late / 10 / cfg.duration / cfg.threads:.1f}%; ratios stay comparable, -t1 avoids it"
        )


# ---------------------------------------------------------------- server-side checks


def sent_ranges(result: RunResult) -> tuple[list[tuple[int, int]], int]:
    """Line ranges wrk sent, and how many of those sends got no response."""
    ranges = [(t["first"], t["first"] + min(t["sent"], t["loaded"])) for t in result.threads]
    unanswered = sum(t["sent"] - t["responses"] for t in result.threads)
    return ranges, unanswered


def sqlite_counts(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [
            r[0]
            for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {n: int(con.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0]) for n in names}
    finally:
        con.close()


def _pick_table(counts: dict[str, int], word: str) -> str | None:
    exact = [n for n in counts if n.lower() in (word, word + "s")]
    loose = sorted(n for n in counts if word in n.lower())
    return (exact or loose or [None])[0]


def check_phasewatch_live(server: Server, result: RunResult) -> None:
    try:
        status, body = http_get(f"{server.base}/tasks?limit=1", timeout=10)
    except OSError as exc:
        status, body = 0, str(exc).encode()
    result.server_check["tasks_limit_1_status"] = status
    if status != 200:
        result.problems.append(f"GET /tasks?limit=1 answered {status}: {body[:200]!r}")
    with contextlib.suppress(OSError, ValueError):
        st, raw = http_get(f"{server.base}/stats", timeout=10)
        if st == 200:
            result.server_check["stats"] = json.loads(raw)


def check_phasewatch_db(
    server: Server, result: RunResult, index: DeliveryIndex, pg: BenchPostgres | None = None
) -> None:
    ranges, unanswered = sent_ranges(result)
    hi = index.distinct(ranges)
    lo = max(hi - unanswered, 0)
    check: dict[str, Any] = {"sent_distinct_event_ids": hi, "acked_distinct_event_ids_min": lo}
    if server.db_url is not None and pg is not None:
        try:
            counts = pg.counts(server.db_url)
        except Exception as exc:  # reported; the run is judged without it
            counts = {}
            result.warnings.append(f"could not read the PostgreSQL database: {exc}")
        check["postgres_tables"] = counts
    else:
        try:
            counts = sqlite_counts(server.db_path)
        except sqlite3.Error as exc:
            counts = {}
            result.warnings.append(f"could not read {server.db_path}: {exc}")
        check["sqlite_tables"] = counts
    table = _pick_table(counts, "event")
    if table is None:
        check["events_plausible"] = "unknown (no events table found)"
    else:
        n = counts[table]
        check.update(events_table=table, events_committed=n, events_plausible=lo <= n <= hi)
        if n < lo:
            result.problems.append(
                f"{table} has {n} rows but >= {lo} distinct events were acknowledged"
            )
        elif n > hi:
            result.warnings.append(f"{table} has {n} rows, more than the {hi} distinct events sent")
    task_table = _pick_table(counts, "task")
    if task_table is not None:
        t_hi = index.distinct(ranges, tasks=True)
        check.update(
            tasks_table=task_table, tasks_committed=counts[task_table], sent_distinct_task_ids=t_hi
        )
    result.server_check.update(check)


def check_bare(server: Server, result: RunResult) -> None:
    try:
        with server.out_file.open("rb") as fh:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except OSError:
        lines = 0
    responses = int(result.wrk.get("responses", result.wrk.get("requests", 0)))
    sent = int(result.wrk.get("sent", 0))
    result.server_check.update(bodies_written=lines, acked=responses, sent=sent)
    if lines < responses:
        result.problems.append(f"only {lines} bodies written but {responses} acknowledged")


# ---------------------------------------------------------------- one run


@dataclass(frozen=True)
class Bench:
    cfg: Config
    wrk: str
    deliveries: Path
    index: DeliveryIndex | None
    pg: BenchPostgres | None = None


def one_run(bench: Bench, name: str, rnd: int, order: int) -> RunResult:
    cfg, index = bench.cfg, bench.index
    result = RunResult(server=name, round=rnd, order=order)
    db_url = None
    if is_postgres(name):
        assert bench.pg is not None
        db_url = bench.pg.fresh(f"r{rnd}_{name}")
        bench.pg.configure(db_url, list(cfg.pg_settings))
        result.server_check["database"] = db_url.rpartition("/")[2]
    n = replicas_of(name)
    servers = [Server(name, cfg, f"r{rnd}" + (f"-{i}" if n > 1 else ""), db_url) for i in range(n)]
    result.log = ", ".join(str(s.log_path) for s in servers)
    try:
        try:
            # One at a time: replicas sharing a database migrate it once, in turn.
            result.startup_s = round(sum(s.start() for s in servers), 3)
        except RuntimeError as exc:
            result.problems.append(str(exc))
            return result
        urls = [f"{s.base}/webhooks/livepeer" for s in servers]
        out = run_wrks(bench.wrk, cfg, urls, bench.deliveries, result)
        (RESULTS / "runs" / f"r{rnd}-{name}.wrk.txt").write_text(out, encoding="utf-8")
        judge_wrk(result, cfg)
        for server in servers:
            if not server.alive():
                result.problems.append(f"{name} died during the run: {server.log_tail(5)}")
            elif name != "bare":
                check_phasewatch_live(server, result)
        codes = [s.stop() for s in servers]
        result.server_check["exit_code"] = codes[0] if n == 1 else codes
        if name == "bare":
            check_bare(servers[0], result)
        elif index is not None and result.threads:
            check_phasewatch_db(servers[0], result, index, bench.pg)
    finally:
        for server in servers:
            server.stop()
            server.cleanup()
        if db_url is not None and bench.pg is not None and not cfg.keep:
            bench.pg.drop(db_url)
    result.valid = not result.problems
    if result.valid:
        result.rps = float(result.wrk["rps"])
    return result


def describe(r: RunResult) -> str:
    if not r.valid:
        return f"  round {r.round} {r.server:<10} INVALID: " + "; ".join(r.problems)
    w = r.wrk
    extra = ""
    if "events_committed" in r.server_check:
        extra = f", {r.server_check['events_committed']} events committed"
    if "per_instance_rps" in w:
        extra += ", per wrk " + " + ".join(f"{x:.0f}" for x in w["per_instance_rps"])
    return (
        f"  round {r.round} {r.server:<10} {r.rps:9.1f} req/s  p50 {w['lat_p50_us'] / 1000:6.2f} ms"
        f"  p99 {w['lat_p99_us'] / 1000:7.2f} ms  ({w['requests']} requests{extra})"
    )


# ---------------------------------------------------------------- summary


def rate(r: RunResult) -> float:
    return r.rps if r.rps is not None else float("nan")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[RunResult], cfg: Config) -> dict[str, Any]:
    summary: dict[str, Any] = {"goal_ratio": GOAL_RATIO, "pg_goal_ratio": PG_GOAL_RATIO}
    for name in cfg.contenders:
        ok = [r for r in runs if r.server == name and r.valid]
        summary[name] = {
            "valid_runs": len(ok),
            "invalid_runs": sum(1 for r in runs if r.server == name and not r.valid),
            "median_rps": _median([rate(r) for r in ok]),
            "median_p50_ms": _median([r.wrk["lat_p50_us"] / 1000 for r in ok]),
            "median_p99_ms": _median([r.wrk["lat_p99_us"] / 1000 for r in ok]),
            "per_round_rps": [round(rate(r), 1) for r in runs if r.server == name],
        }
    summary["ratios"] = {}
    for name in cfg.contenders:
        if name == "bare" or "bare" not in cfg.contenders:
            continue
        ratios = []
        for rnd in range(cfg.rounds):
            pair = {r.server: r for r in runs if r.round == rnd and r.valid}
            if "bare" in pair and name in pair:
                ratios.append(rate(pair[name]) / rate(pair["bare"]))
        b, p = summary["bare"]["median_rps"], summary[name]["median_rps"]
        key = _median(ratios)
        summary["ratios"][name] = {
            "per_round_ratio": [round(x, 4) for x in ratios],
            "median_of_ratios": key,
            "ratio_of_medians": p / b if b and p else None,
            "goal_ratio": goal_for(name),
            "goal_met": None if key is None else key >= goal_for(name),
        }
    main = summary["ratios"].get("phasewatch", {})  # the historical keys: SQLite
    summary["per_round_ratio"] = main.get("per_round_ratio", [])
    summary["median_of_ratios"] = main.get("median_of_ratios")
    summary["ratio_of_medians"] = main.get("ratio_of_medians")
    summary["goal_met"] = main.get("goal_met")
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: list[RunResult], summary: dict[str, Any], cfg: Config) -> None:
    by = {(r.round, r.server): r for r in runs}
    names = list(cfg.contenders)
    width = [max(len(n) + 6, 12) for n in names]
    print()
    print(
        f"{'round':>5} | "
        + " | ".join(
            f"{n + ' req/s':>{w}} {'p50 ms':>7} {'p99 ms':>7}"
            for n, w in zip(names, width, strict=True)
        )
    )
    line = 8 + sum(w + 19 for w in width)
    print("-" * line)
    for rnd in range(cfg.rounds):
        cells = []
        for name, w in zip(names, width, strict=True):
            r = by.get((rnd, name))
            if r is None:
                cells.append(f"{'-':>{w}} {'-':>7} {'-':>7}")
            elif not r.valid:
                cells.append(f"{'INVALID':>{w}} {'-':>7} {'-':>7}")
            else:
                cells.append(
                    f"{r.rps:>{w}.1f} {r.wrk['lat_p50_us'] / 1000:>7.2f} "
                    f"{r.wrk['lat_p99_us'] / 1000:>7.2f}"
                )
        print(f"{rnd:>5} | " + " | ".join(cells))
    print("-" * line)
    meds = []
    for name, w in zip(names, width, strict=True):
        m = summary[name]
        meds.append(
            f"{_fmt(m['median_rps'], f'{w}.1f'):>{w}} {_fmt(m['median_p50_ms'], '7.2f'):>7}"
            f" {_fmt(m['median_p99_ms'], '7.2f'):>7}"
        )
    print(f"{'med':>5} | " + " | ".join(meds))
    print()
    for name, ratio in summary["ratios"].items():
        goal = ratio["goal_met"]
        print(
            f"{name} / bare: median of per-round ratios {_fmt(ratio['median_of_ratios'], '.3f')}"
            f" {ratio['per_round_ratio']}, ratio of medians"
            f" {_fmt(ratio['ratio_of_medians'], '.3f')} (goal >= {ratio['goal_ratio']}): "
            + ("n/a" if goal is None else ("MET" if goal else "NOT MET"))
        )


# ---------------------------------------------------------------- machine


def machine_info(wrk: str) -> dict[str, Any]:
    py = VENV_PY if VENV_PY.exists() else Path(sys.executable)
    probe = subprocess.run(
        [
            str(py),
            "-c",
            "import sys, asyncio, aiohttp, importlib.util as u; print(sys.version.split()[0]);"
            "print(aiohttp.__version__); print(u.find_spec('uvloop') is not None);"
            "print(type(asyncio.get_event_loop_policy()).__name__)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [*probe.stdout.split(), "?", "?", "?", "?"]
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": lines[0],
        "python_executable": str(py),
        "aiohttp": lines[1],
        "uvloop_installed": lines[2] == "True",
        "event_loop_policy": lines[3],
        "wrk": wrk_version.stdout.strip().splitlines()[0] if wrk_version.stdout else "?",
        "loadavg_start": os.getloadavg(),
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[Config, bool]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=15, help="seconds of wrk per run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    ap.add_argument("--timeout", type=int, default=10, help="wrk --timeout, seconds")
    ap.add_argument(
        "--deliveries",
        type=int,
        default=DEFAULT_DELIVERIES,
        help="deliveries in the replayed file (each run replays it from line 1)",
    )
    ap.add_argument("--seed", type=int, default=gen_deliveries.DEFAULT_SEED)
    ap.add_argument("--secret", default=gen_deliveries.DEFAULT_SECRET)
    ap.add_argument(
        "--only",
        help="comma-separated contenders to run, of: bare, phasewatch (SQLite), postgres,"
        " postgres-xN (N replicas)",
    )
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="add PostgreSQL contenders, on a local server started for the run"
        " (deploy/postgres_local.py, fsync on); a fresh database per run",
    )
    ap.add_argument(
        "--database-url",
        help="add PostgreSQL contenders on this existing server instead (an admin URL whose"
        " user may CREATE DATABASE; each run gets a fresh database, dropped after)",
    )
    ap.add_argument(
        "--pg-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for each fresh database (ALTER DATABASE ... SET), e.g."
        " plan_cache_mode=force_custom_plan; repeatable",
    )
    ap.add_argument(
        "--replicas",
        default="1",
        help="PostgreSQL contenders' replica counts, comma-separated (1,2: postgres and"
        " postgres-x2, two serve processes on one database, one wrk each)",
    )
    ap.add_argument(
        "--phasewatch-cmd",
        default=f"{PHASEWATCH_BIN} serve",
        help="command that starts phasewatch (configured through PHASEWATCH_* env)",
    )
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the servers' scratch dirs")
    ap.add_argument("--install-wrk", action="store_true", help="apt-get install wrk if missing")
    ap.add_argument("--json", type=Path, default=RESULTS / "webhook.json")
    a = ap.parse_args(argv)
    if min(a.rounds, a.duration, a.connections, a.threads, a.deliveries) <= 0:
        ap.error("--rounds/--duration/--connections/--threads/--deliveries must be positive")
    if a.connections < a.threads:
        ap.error("--connections must be >= --threads")
    try:
        replicas = [int(x) for x in a.replicas.split(",") if x.strip()]
    except ValueError:
        ap.error("--replicas: comma-separated integers, e.g. 1,2")
    if not replicas or min(replicas) < 1:
        ap.error("--replicas: at least one count, each >= 1")
    contenders = list(SERVERS)
    if a.postgres or a.database_url:
        contenders += [pg_name(n) for n in replicas]
    if a.only:
        contenders = [x.strip() for x in a.only.split(",") if x.strip()]
        for name in contenders:
            if name not in SERVERS and not is_postgres(name):
                ap.error(f"--only: unknown contender {name!r}")
    if any(is_postgres(n) and replicas_of(n) * a.threads > a.connections for n in contenders):
        ap.error("--connections must be >= replicas x --threads")
    cfg = Config(
        rounds=a.rounds,
        duration=a.duration,
        connections=a.connections,
        threads=a.threads,
        timeout=a.timeout,
        deliveries=a.deliveries,
        seed=a.seed,
        secret=a.secret,
        only=a.only,
        contenders=tuple(contenders),
        pg_admin_url=a.database_url,
        pg_settings=tuple(a.pg_set),
        phasewatch_cmd=shlex.split(a.phasewatch_cmd),
        ready_timeout=a.ready_timeout,
        keep=a.keep,
        out_json=a.json,
    )
    return cfg, a.install_wrk


def main(argv: list[str] | None = None) -> int:
    cfg, install = parse_args(argv)
    wrk = ensure_wrk(install)
    servers = list(cfg.contenders)
    exe = cfg.phasewatch_cmd[0] if cfg.phasewatch_cmd else ""
    if servers != ["bare"] and not (Path(exe).exists() or shutil.which(exe)):
        raise SystemExit(f"{exe!r} not found (pip install -e . in the venv?)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    deliveries, meta = ensure_deliveries(cfg)
    index = DeliveryIndex(deliveries) if servers != ["bare"] else None
    with contextlib.ExitStack() as stack:
        pg = None
        if any(is_postgres(n) for n in servers):
            pg = stack.enter_context(bench_postgres(cfg.pg_admin_url))
        return _main(
            cfg=cfg, wrk=wrk, servers=servers, deliveries=deliveries, meta=meta, index=index, pg=pg
        )


def _main(
    *,
    cfg: Config,
    wrk: str,
    servers: list[str],
    deliveries: Path,
    meta: dict[str, Any],
    index: DeliveryIndex | None,
    pg: BenchPostgres | None,
) -> int:
    machine = machine_info(wrk)
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), Python {machine['python']}"
        f", aiohttp {machine['aiohttp']}, loop policy {machine['event_loop_policy']}"
        f" (uvloop installed: {machine['uvloop_installed']}), {machine['wrk']}"
    )
    print(
        f"wrk {' '.join(cfg.wrk_args())} -s {LUA.name}; {cfg.deliveries} deliveries "
        f"({meta['stats']['distinct_event_ids']} distinct event ids) from {deliveries}"
    )
    if pg is not None:
        machine["postgres"] = pg.server_version()
        print(
            f"postgres: {machine['postgres']} ({cfg.pg_admin_url or 'local, started for the run'})"
        )
    machine["code"] = code_state()
    print(f"code: {machine['code']}")
    bench = Bench(cfg=cfg, wrk=wrk, deliveries=deliveries, index=index, pg=pg)
    runs: list[RunResult] = []
    started = time.monotonic()
    for rnd in range(cfg.rounds):
        order = servers if rnd % 2 == 0 else servers[::-1]
        for pos, name in enumerate(order):
            result = one_run(bench, name, rnd, pos)
            runs.append(result)
            print(describe(result), flush=True)
            for w in result.warnings:
                print(f"    warning: {w}")
            time.sleep(1.0)  # let sockets in TIME_WAIT and the page cache settle
    summary = summarize(runs, cfg)
    print_table(runs, summary, cfg)
    machine["loadavg_end"] = os.getloadavg()
    report = {
        "benchmark": "end-to-end webhook events/s, signed deliveries, 2xx after commit",
        "config": {
            **asdict(cfg),
            "out_json": str(cfg.out_json),
            "wrk_args": cfg.wrk_args(),
            "lua": str(LUA),
        },
        "machine": machine,
        "deliveries": {"file": str(deliveries), **meta.get("stats", {})},
        "elapsed_s": round(time.monotonic() - started, 1),
        "runs": [asdict(r) for r in runs],
        "summary": summary,
    }
    cfg.out_json.parent.mkdir(parents=True, exist_ok=True)
    cfg.out_json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {cfg.out_json}")
    return 0 if all(r.valid for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
