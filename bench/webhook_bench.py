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

Results: a table on stdout and ``bench/results/webhook.json``. Goal: phasewatch reaches
at least 0.5x the bare receiver's events/s (median of per-round ratios).

    .venv/bin/python bench/webhook_bench.py                 # 3 rounds, -t1 -c32 -d15s
    .venv/bin/python bench/webhook_bench.py --only bare --rounds 1
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

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LUA = BENCH / "wrk_replay.lua"
VENV_PY = REPO / ".venv" / "bin" / "python"
PHASEWATCH_BIN = REPO / ".venv" / "bin" / "phasewatch"
HOST = "127.0.0.1"
GOAL_RATIO = 0.5
SERVERS = ("bare", "phasewatch")
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

    def wrk_args(self) -> list[str]:
        return [
            f"-t{self.threads}",
            f"-c{self.connections}",
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

    def __init__(self, name: str, cfg: Config, tag: str) -> None:
        self.name = name
        self.cfg = cfg
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
            PHASEWATCH_DATABASE_URL=f"sqlite:///{self.db_path}",
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
    env = {
        **os.environ,
        "PHASEWATCH_BENCH_DELIVERIES": str(deliveries),
        "PHASEWATCH_BENCH_THREADS": str(cfg.threads),
        "PHASEWATCH_BENCH_OFFSET": "0",
        "PHASEWATCH_BENCH_COUNT": str(cfg.deliveries),
    }
    cmd = [wrk, *cfg.wrk_args(), "-s", str(LUA), url]
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=cfg.duration + 120,
        )
    except subprocess.TimeoutExpired:
        result.problems.append(f"wrk did not finish within {cfg.duration + 120}s")
        return ""
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        result.problems.append(f"wrk exited with {proc.returncode}")
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        fields = {k: _num(v) for k, v in _KV.findall(rest)}
        if kind == "PWBENCH":
            result.wrk = fields
        elif kind == "PWBENCH_THREAD":
            result.threads.append({k: int(v) for k, v in fields.items()})
        elif kind == "PWBENCH_STATUS":
            code = str(fields["code"])
            result.statuses[code] = result.statuses.get(code, 0) + int(fields["count"])
        elif kind == "PWBENCH_ERROR":
            result.problems.append(rest)
    return out


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


def check_phasewatch_db(server: Server, result: RunResult, index: DeliveryIndex) -> None:
    ranges, unanswered = sent_ranges(result)
    hi = index.distinct(ranges)
    lo = max(hi - unanswered, 0)
    check: dict[str, Any] = {"sent_distinct_event_ids": hi, "acked_distinct_event_ids_min": lo}
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


def one_run(bench: Bench, name: str, rnd: int, order: int) -> RunResult:
    cfg, index = bench.cfg, bench.index
    result = RunResult(server=name, round=rnd, order=order)
    server = Server(name, cfg, f"r{rnd}")
    result.log = str(server.log_path)
    try:
        try:
            result.startup_s = round(server.start(), 3)
        except RuntimeError as exc:
            result.problems.append(str(exc))
            return result
        url = f"{server.base}/webhooks/livepeer"
        out = run_wrk(bench.wrk, cfg, url, bench.deliveries, result)
        (RESULTS / "runs" / f"r{rnd}-{name}.wrk.txt").write_text(out, encoding="utf-8")
        judge_wrk(result, cfg)
        if not server.alive():
            result.problems.append(f"{name} died during the run: {server.log_tail(5)}")
        elif name == "phasewatch":
            check_phasewatch_live(server, result)
        rc = server.stop()
        result.server_check["exit_code"] = rc
        if name == "bare":
            check_bare(server, result)
        elif index is not None and result.threads:
            check_phasewatch_db(server, result, index)
    finally:
        server.stop()
        server.cleanup()
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
    summary: dict[str, Any] = {"goal_ratio": GOAL_RATIO}
    for name in SERVERS:
        ok = [r for r in runs if r.server == name and r.valid]
        summary[name] = {
            "valid_runs": len(ok),
            "invalid_runs": sum(1 for r in runs if r.server == name and not r.valid),
            "median_rps": _median([rate(r) for r in ok]),
            "median_p50_ms": _median([r.wrk["lat_p50_us"] / 1000 for r in ok]),
            "median_p99_ms": _median([r.wrk["lat_p99_us"] / 1000 for r in ok]),
        }
    ratios = []
    for rnd in range(cfg.rounds):
        pair = {r.server: r for r in runs if r.round == rnd and r.valid}
        if "bare" in pair and "phasewatch" in pair:
            ratios.append(rate(pair["phasewatch"]) / rate(pair["bare"]))
    summary["per_round_ratio"] = [round(x, 4) for x in ratios]
    summary["median_of_ratios"] = _median(ratios)
    b, p = summary["bare"]["median_rps"], summary["phasewatch"]["median_rps"]
    summary["ratio_of_medians"] = p / b if b and p else None
    key = summary["median_of_ratios"]
    summary["goal_met"] = None if key is None else key >= GOAL_RATIO
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: list[RunResult], summary: dict[str, Any], cfg: Config) -> None:
    by = {(r.round, r.server): r for r in runs}
    print()
    print(
        f"{'round':>5} | {'bare req/s':>10} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'phasewatch req/s':>16} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>6}"
    )
    print("-" * 86)
    for rnd in range(cfg.rounds):
        cells = []
        for name, width in (("bare", 10), ("phasewatch", 16)):
            r = by.get((rnd, name))
            if r is None:
                cells.append(f"{'-':>{width}} {'-':>7} {'-':>7}")
            elif not r.valid:
                cells.append(f"{'INVALID':>{width}} {'-':>7} {'-':>7}")
            else:
                cells.append(
                    f"{r.rps:>{width}.1f} {r.wrk['lat_p50_us'] / 1000:>7.2f} "
                    f"{r.wrk['lat_p99_us'] / 1000:>7.2f}"
                )
        b, p = by.get((rnd, "bare")), by.get((rnd, "phasewatch"))
        ratio = rate(p) / rate(b) if b and p and b.valid and p.valid else None
        print(f"{rnd:>5} | {cells[0]} | {cells[1]} | {_fmt(ratio, '6.3f'):>6}")
    print("-" * 86)
    sb, sp = summary["bare"], summary["phasewatch"]
    print(
        f"{'med':>5} | {_fmt(sb['median_rps'], '10.1f'):>10} {_fmt(sb['median_p50_ms'], '7.2f'):>7}"
        f" {_fmt(sb['median_p99_ms'], '7.2f'):>7} | {_fmt(sp['median_rps'], '16.1f'):>16}"
        f" {_fmt(sp['median_p50_ms'], '7.2f'):>7} {_fmt(sp['median_p99_ms'], '7.2f'):>7} |"
    )
    print()
    print(
        f"phasewatch / bare: median of per-round ratios {_fmt(summary['median_of_ratios'], '.3f')}"
        f", ratio of medians {_fmt(summary['ratio_of_medians'], '.3f')}"
        f" (goal >= {GOAL_RATIO})"
    )
    goal = summary["goal_met"]
    print("goal: " + ("n/a" if goal is None else ("MET" if goal else "NOT MET")))


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
    ap.add_argument("--only", choices=SERVERS)
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
        phasewatch_cmd=shlex.split(a.phasewatch_cmd),
        ready_timeout=a.ready_timeout,
        keep=a.keep,
        out_json=a.json,
    )
    return cfg, a.install_wrk


def main(argv: list[str] | None = None) -> int:
    cfg, install = parse_args(argv)
    wrk = ensure_wrk(install)
    servers = [cfg.only] if cfg.only else list(SERVERS)
    exe = cfg.phasewatch_cmd[0] if cfg.phasewatch_cmd else ""
    if "phasewatch" in servers and not (Path(exe).exists() or shutil.which(exe)):
        raise SystemExit(f"{exe!r} not found (pip install -e . in the venv?)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    deliveries, meta = ensure_deliveries(cfg)
    index = DeliveryIndex(deliveries) if "phasewatch" in servers else None
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
    bench = Bench(cfg=cfg, wrk=wrk, deliveries=deliveries, index=index)
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
