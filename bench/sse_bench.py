"""The changes stream under load: 100 SSE clients on ``GET /changes/stream`` while
webhooks commit 1,000 phase changes a second, against a real ``phasewatch serve``.

Two parts, each run on a fresh server and a fresh SQLite file (``--database-url`` for an
existing PostgreSQL database instead: then every run uses it, not emptied):

1. **Latency and memory.** The clients (a process of their own, ``--client``) open their
   streams at ``after=now``; then this process posts ``--rate`` signed webhooks a second
   for ``--seconds``, each the first event of a new task (one phase change each),
   recording when each was sent and when its 2xx came back (2xx means committed). Each
   client notes when each change's event arrived. Commit->client latency is arrival
   minus the 2xx (an upper bound of the commit time; negative when the event beat the
   2xx back, counted as 0). The server's RSS (its process and the SQLite writer child)
   is sampled twice a second. Every client must see every change, once.
2. **Webhook throughput, with and without clients.** wrk (``bench/wrk_replay.lua``,
   the pre-signed deliveries of ``bench/webhook_bench.py``) at full speed for
   ``--wrk-seconds`` at ``-t1 -c32``, in runs without and with the 100 clients, the two
   alternating which goes first round by round, ``--rounds`` rounds. The figure is wrk's
   req/s; the ratio is the median of the per-round with/without ratios. Scenarios
   (``--throughput-scenario``, comma-separated; default ``paced``):

   * ``paced``, the issue's: in both kinds of run this process also posts ``--rate``
     signed webhooks a second (as in part 1, each a new task's first event) of task type
     ``ssebench``, which wrk's deliveries never use, from a second before wrk starts
     until it ends; the clients stream ``?type=ssebench&after=now``, so they get exactly
     those ``--rate`` changes a second while the server commits wrk's too. These
     requests are not in wrk's figure; their achieved rate, errors and 2xx latency are
     reported. After wrk ends, the clients get up to ``--grace`` seconds to receive
     every change that was acknowledged; a client that missed any (fewer than the paced
     2xx), or got more than were sent, fails the run (exit status 1).
   * ``all``, a harder case: no paced load, and the clients stream everything wrk
     commits (about twice the issue's rate, and more the faster wrk goes).

   CPU seconds during wrk's window are sampled from ``/proc`` for each process: the
   server and its children, the clients, this process (the paced load), wrk, and the
   rest of the machine (``others``: other people's work on a shared machine, i.e. noise).

Goals (issue #14): p99 commit->client under 100 ms, RSS flat, webhook throughput with
clients within noise of without. Results: a summary on stdout and
``bench/results/sse.json``. Everything listens on 127.0.0.1. The machine running it
runs the clients and the load too: on a small machine they compete with the server for
the same cores, which is part of what the numbers show.

    .venv/bin/python bench/sse_bench.py                       # 100 clients, 1000/s, 20 s
    .venv/bin/python bench/sse_bench.py --rounds 3 --throughput-scenario paced,all
    .venv/bin/python bench/sse_bench.py --skip-latency --rounds 1 --wrk-seconds 8
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LUA = BENCH / "wrk_replay.lua"
HOST = "127.0.0.1"
SECRET = b"whsec_bench"
DELIVERIES = RESULTS / "deliveries-300000-seed1.tsv"  # bench/webhook_bench.py makes it
PHASEWATCH = str(Path(sys.executable).with_name("phasewatch"))

# Latency is sampled on every 10th change (ids ending in 0), at every client: the same
# distribution at a tenth of the clients' parsing, which competes with the server for CPU.
_EVENT_ID = re.compile(rb'"eventId":"lat-(\d*0)"')
SAMPLE = 10

# The paced load of the throughput part: a task type that wrk's deliveries never use
# (theirs are the fixture's: upload, clip, export, transcode-file, ...), so that a
# client streaming ?type=ssebench gets the paced changes and none of wrk's.
PACED_TYPE = "ssebench"
PACED_LEAD_S = 1.0  # the paced load (and the clients' streams) run this long before wrk
SCENARIOS = ("paced", "all")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def sign(body: bytes) -> str:
    t = int(time.time() * 1000)
    digest = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


# ------------------------------------------------------------------------- CPU


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) so far of process ``pid`` (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds every CPU of the machine spent busy so far (not idle or iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples, every ``every`` s on a thread, the CPU seconds of the processes that
    ``pids()`` names and the machine's busy seconds, so that a window (wrk's, which
    starts after its own set-up) can be cut afterwards. A process read after it has
    ended keeps its last value."""

    def __init__(self, pids: Callable[[], dict[str, int]], every: float = 0.1) -> None:
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        values = {"machine": machine_busy_s()}
        for name, pid in self.pids().items():
            cpu = proc_cpu_s(pid)
            if cpu is not None:
                values[name] = cpu
        self.samples.append((time.monotonic(), values))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._sample()

    def _at(self, t: float) -> dict[str, float]:
        """Each name's value in the last sample at or before ``t`` that has it (the
        first sample that has it, when none before)."""
        out: dict[str, float] = {}
        for when, values in self.samples:
            if when > t:
                for name, v in values.items():
                    out.setdefault(name, v)
            else:
                out.update(values)
        return out

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per name between ``t0`` and ``t1`` (monotonic), and ``others``:
        the machine's busy seconds that none of the named processes account for (other
        people's processes, and kernel work charged to no process)."""
        a, b = self._at(t0), self._at(t1)
        out = {k: round(v - a.get(k, v), 2) for k, v in b.items() if k != "machine"}
        machine = b.get("machine", 0.0) - a.get("machine", 0.0)
        out["others"] = round(machine - sum(out.values()), 2)
        return out


# ------------------------------------------------------------------------- server


class Serve:
    def __init__(self, tag: str, database_url: str | None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"pwsse-{tag}-"))
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        RESULTS.joinpath("runs").mkdir(parents=True, exist_ok=True)
        self.log = RESULTS / "runs" / f"sse-{tag}.log"
        env = {
            **os.environ,
            "PHASEWATCH_DATABASE_URL": database_url or f"sqlite:///{self.tmp / 'pw.db'}",
            "PHASEWATCH_HTTP_HOST": HOST,
            "PHASEWATCH_HTTP_PORT": str(self.port),
            "PHASEWATCH_WEBHOOK_SECRET": SECRET.decode(),
            "PHASEWATCH_WEBHOOK_TOLERANCE_S": "0",
        }
        # e.g. "python -m cProfile -o /tmp/serve.prof -m consumer.cli.main" to profile it
        command = os.environ.get("PHASEWATCH_BENCH_SERVE_CMD", PHASEWATCH).split()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*command, "serve"],
                env=env,
                cwd=self.tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("serve not ready after 60 s")

    def pids(self) -> list[int]:
        """The server and its children (the SQLite writer process)."""
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *map(int, children)]

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def named_pids(self) -> dict[str, int]:
        """``serve`` and its children: ``writer`` (the SQLite writer process),
        ``tracker`` (multiprocessing's resource tracker), else ``child<k>``."""
        out = {"serve": self.proc.pid}
        for k, pid in enumerate(self.pids()[1:], 1):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"multiprocessing.spawn" in command:
                out["writer" if "writer" not in out else f"child{k}"] = pid
            elif b"multiprocessing.resource_tracker" in command:
                out["tracker"] = pid
            else:
                out[f"child{k}"] = pid
        return out

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of the server and of its children."""
        out: dict[str, float] = {}
        for name, pid in self.named_pids().items():
            cpu = proc_cpu_s(pid)
            if cpu is not None:
                out[name] = cpu
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------- clients


class Clients:
    """The client process, driven from here over its stdin/stdout."""

    def __init__(self, url: str, n: int, expect: int, mode: str, query: str = "") -> None:
        """``query``: the streams' filter (``type=ssebench``), besides ``after=now``."""
        self.out = Path(tempfile.mkstemp(prefix="pwsse-clients-", suffix=".json")[1])
        command = [sys.executable, __file__, "--client", url, str(n), str(expect), mode]
        self.proc = subprocess.Popen(
            [*command, str(self.out), "--client-query", query],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"clients did not connect: {line!r}")

    def finish(
        self, acks: Path | None = None, want: int | None = None, grace: float = 0.0
    ) -> dict[str, Any]:
        """Stop the clients and return their result. Latency mode: they first wait (up
        to 60 s) for every change of the acks. ``want`` (count mode): they first wait up
        to ``grace`` s for every client to have counted ``want`` changes."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"done {acks or '-'} {want if want is not None else '-'} {grace}\n")
        self.proc.stdin.flush()
        self.proc.wait(max(grace, 60) + 30)
        result: dict[str, Any] = json.loads(self.out.read_text())
        self.out.unlink()
        return result


class _Streams:
    """The client process's ``n`` streams from ``after=now``, filtered by ``query``.
    ``latency``: note when each sampled ``lat-<i>`` change arrived at each client;
    ``count``: count change events. A stream that ends reconnects with its
    Last-Event-ID (counted) and the same filter."""

    def __init__(self, url: str, n: int, expect: int, mode: str, query: str = "") -> None:
        self.url, self.n, self.expect, self.mode = url, n, expect, mode
        self.query = dict(urllib.parse.parse_qsl(query))
        self.arrivals = [array.array("d", [0.0]) * max(expect, 1) for _ in range(n)]
        self.counts = [0] * n
        self.reconnects = 0
        self.duplicates = 0
        # Clients with every expected change: ``want`` of them (latency mode: ``expect``
        # from the start; count mode: from ``done``, when the load is over).
        self.want: int | None = expect if mode == "latency" else None
        self.complete = 0
        self.complete_after_s: float | None = None  # from ``done`` until all were in

    async def run(self) -> str:
        """Connect, say ``ready``; on ``done <acks> <want> <grace>`` (stdin) wait
        (latency mode: up to 60 s; count mode with a want: up to grace s) for every
        client to have every change; the acks path."""
        loop = asyncio.get_running_loop()
        self.connected = asyncio.Semaphore(0)
        self.all_in = asyncio.Event()
        self.stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks = [asyncio.create_task(self.stream(k, session)) for k in range(self.n)]
            for _ in range(self.n):
                await self.connected.acquire()
            print("ready", flush=True)
            line: str = await loop.run_in_executor(None, sys.stdin.readline)
            words = [*line.split(), "-", "-", "-", "0"][:4]
            done_at = loop.time()
            wait_s: float | None = 60 if self.mode == "latency" else None
            if self.mode == "count" and words[2] != "-":
                self.want, wait_s = int(words[2]), float(words[3])
                self.complete = sum(1 for c in self.counts if c >= self.want)
                if self.complete == self.n:
                    self.all_in.set()
            if wait_s is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.all_in.wait(), wait_s)
                if self.all_in.is_set():
                    self.complete_after_s = round(loop.time() - done_at, 3)
            self.stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return words[1]

    async def stream(self, k: int, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        last: str | None = None
        first = True
        while not self.stop.is_set():
            params = {**self.query, "after": "now"} if last is None else self.query
            headers = {"Last-Event-ID": last} if last else {}
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(
                    f"{self.url}/changes/stream", params=params, headers=headers
                ) as response:
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        now = loop.time()
                        if first:
                            first = False
                            self.connected.release()
                        buffer += chunk
                        cut = buffer.rfind(b"\n\n")
                        if cut >= 0:
                            whole, buffer = buffer[: cut + 2], buffer[cut + 2 :]
                            last = self.take(k, whole, now) or last
            if not self.stop.is_set():
                self.reconnects += 1
                await asyncio.sleep(0.2)

    def take(self, k: int, whole: bytes, now: float) -> str | None:
        """Account for whole events received at ``now``; the last id among them."""
        before = self.counts[k]
        self.counts[k] += whole.count(b"event: change")
        if self.mode == "latency":
            mine = self.arrivals[k]
            for match in _EVENT_ID.finditer(whole):
                i = int(match[1])
                if i >= self.expect:
                    continue
                if mine[i] == 0.0:
                    mine[i] = now
                else:
                    self.duplicates += 1
        if self.want is not None and before < self.want <= self.counts[k]:
            self.complete += 1
            if self.complete == self.n:
                self.all_in.set()
        at = whole.rfind(b"id: ")
        return whole[at + 4 : whole.index(b"\n", at)].decode() if at >= 0 else None

    def result(self, acks_path: str) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result: dict[str, Any] = {
            "clients": self.n,
            "counts": self.counts,
            "reconnects": self.reconnects,
            "duplicates": self.duplicates,
            "complete_after_s": self.complete_after_s,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        }
        if self.mode != "latency" or acks_path == "-":
            return result
        acks = orjson.loads(Path(acks_path).read_bytes())
        ack, sent = acks["ack"], acks["sent"]
        commit, end_to_end, missing = [], [], 0
        for mine in self.arrivals:
            for i in range(0, self.expect, SAMPLE):
                t = mine[i]
                if t == 0.0 or ack[i] is None:
                    missing += 1
                    continue
                commit.append(max(t - ack[i], 0.0))
                end_to_end.append(t - sent[i])
        result.update(
            missing=missing,
            commit_to_client_ms=_percentiles(commit),
            send_to_client_ms=_percentiles(end_to_end),
        )
        return result


def client_main(url: str, n: int, expect: int, mode: str, out: Path, *, query: str) -> None:
    streams = _Streams(url, n, expect, mode, query)
    acks_path = asyncio.run(streams.run())
    out.write_bytes(orjson.dumps(streams.result(acks_path)))


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values.sort()

    def at(q: float) -> float:
        return round(values[min(int(q * len(values)), len(values) - 1)] * 1000, 2)

    return {
        "n": len(values),
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": round(values[-1] * 1000, 2),
    }


# ------------------------------------------------------------------------- load


async def paced_load(
    url: str,
    rate: int,
    seconds: float | None,
    tag: str,
    *,
    stop: asyncio.Event | None = None,
    task_type: str = "upload",
    event_prefix: str = "lat",
) -> dict[str, Any]:
    """``rate`` webhooks a second for ``seconds`` (None: until ``stop`` is set), each a
    new task's first event, of type ``task_type``, with event id ``<prefix>-<i>``; then
    wait for the answers of those still in flight. ``sent`` and ``ack``: when each
    request was sent and its 2xx came back (loop time), None if it never did."""
    total = int(rate * seconds) if seconds is not None else None
    loop = asyncio.get_running_loop()
    sent: list[float | None] = []
    ack: list[float | None] = []
    failures = 0
    max_late = 0.0  # how far behind its schedule the load fell at worst
    inflight = asyncio.Semaphore(256)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal failures
        now_ms = int(time.time() * 1000)
        task_id = f"sse-{tag}-{i}"
        body = orjson.dumps(
            {
                "id": f"{event_prefix}-{i}",
                "webhookId": "wh-bench",
                "createdAt": now_ms,
                "timestamp": now_ms,
                "event": "task.spawned",
                "payload": {
                    "task": {
                        "id": task_id,
                        "type": task_type,
                        "snapshot": {
                            "id": task_id,
                            "type": task_type,
                            "createdAt": now_ms,
                            "status": {"phase": "pending", "updatedAt": now_ms},
                        },
                    }
                },
            }
        )
        async with inflight:
            sent[i] = loop.time()
            try:
                async with session.post(
                    f"{url}/webhooks/livepeer",
                    data=body,
                    headers={"Livepeer-Signature": sign(body), "Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    if response.status == 200:
                        ack[i] = loop.time()
                    else:
                        failures += 1
            except aiohttp.ClientError:
                failures += 1

    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = loop.time()
        pending: set[asyncio.Task[None]] = set()
        i = 0
        while i != total and not (stop is not None and stop.is_set()):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_late = max(max_late, -delay)
            sent.append(None)
            ack.append(None)
            task = asyncio.create_task(one(session, i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        end = loop.time()
        await asyncio.gather(*pending)
        elapsed = loop.time() - start
    acked = sum(1 for a in ack if a is not None)
    return {
        "sent": sent,
        "ack": ack,
        "total": i,
        "acked": acked,
        "failures": failures,
        "rate": round(i / elapsed, 1),
        "start": start,
        "end": end,
        "max_late_ms": round(max_late * 1000, 1),
    }


def sample_rss(serve: Serve, stop: threading.Event, into: list[tuple[float, float]]) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        into.append((round(time.monotonic() - t0, 1), round(serve.rss_mb(), 1)))
        stop.wait(0.5)


def latency_part(args: argparse.Namespace) -> dict[str, Any]:
    serve = Serve("latency", args.database_url)
    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    try:
        total = int(args.rate * args.seconds)
        clients = Clients(serve.url, args.clients, total, "latency")
        idle_rss = serve.rss_mb()
        sampler = threading.Thread(target=sample_rss, args=(serve, stop, rss), daemon=True)
        sampler.start()
        cpu0 = serve.cpu_s()
        own0 = resource.getrusage(resource.RUSAGE_SELF)
        load = asyncio.run(paced_load(serve.url, args.rate, args.seconds, "lat"))
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu1 = serve.cpu_s()
        acks = Path(tempfile.mkstemp(prefix="pwsse-acks-", suffix=".json")[1])
        acks.write_bytes(orjson.dumps({"sent": load["sent"], "ack": load["ack"]}))
        result = clients.finish(acks)
        acks.unlink()
        stop.set()
        sampler.join()
    finally:
        stop.set()
        serve.stop()
    rss_values = [mb for _, mb in rss]
    third = max(len(rss_values) // 3, 1)
    return {
        "clients": args.clients,
        "rate_target": args.rate,
        "rate_achieved": load["rate"],
        "webhooks": load["total"],
        "acked": load["acked"],
        "failures": load["failures"],
        "every_client_every_change": result.get("missing") == 0
        and result["duplicates"] == 0
        and min(result["counts"]) == total,
        "duplicates": result["duplicates"],
        "events_per_client": {"min": min(result["counts"]), "max": max(result["counts"])},
        "missing": result.get("missing"),
        "reconnects": result["reconnects"],
        "commit_to_client_ms": result.get("commit_to_client_ms"),
        "send_to_client_ms": result.get("send_to_client_ms"),
        "cpu_s_during_load": {
            **{k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items()},
            "loader": round(own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime, 2),
            "clients_total": result.get("cpu_s"),
        },
        "rss_mb": {
            "idle_with_clients": round(idle_rss, 1),
            "first_third_mean": round(statistics.mean(rss_values[:third]), 1),
            "last_third_mean": round(statistics.mean(rss_values[-third:]), 1),
            "max": max(rss_values),
            "samples": rss,
        },
    }


def run_wrk(url: str, seconds: int, pids: dict[str, int]) -> tuple[dict[str, Any], float]:
    """wrk's PWBENCH summary, and when it ended (monotonic). Its pid is in ``pids``
    (``wrk``) while it runs, for the CPU sampler."""
    env = {
        **os.environ,
        "PHASEWATCH_BENCH_DELIVERIES": str(DELIVERIES),
        "PHASEWATCH_BENCH_THREADS": "1",
        "PHASEWATCH_BENCH_OFFSET": "0",
    }
    with subprocess.Popen(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "--timeout=10s", "-s", str(LUA), url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        pids["wrk"] = proc.pid
        try:
            stdout, stderr = proc.communicate(timeout=seconds + 120)
        finally:
            ended = time.monotonic()
            del pids["wrk"]
            if proc.poll() is None:
                proc.kill()
    summary: dict[str, Any] = {}
    for line in stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "PWBENCH":
            summary = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    if not summary:
        raise RuntimeError(f"no PWBENCH summary from wrk:\n{stdout}\n{stderr}")
    return summary, ended


async def wrk_with_paced_load(
    url: str, args: argparse.Namespace, tag: str, pids: dict[str, int]
) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """The paced load of ``PACED_TYPE`` from PACED_LEAD_S before wrk starts until it
    ends, wrk running meanwhile (on a thread: the load keeps this loop)."""
    stop = asyncio.Event()
    load = asyncio.create_task(
        paced_load(url, args.rate, None, tag, stop=stop, task_type=PACED_TYPE, event_prefix="tp")
    )
    try:
        await asyncio.sleep(PACED_LEAD_S)
        summary, ended = await asyncio.to_thread(run_wrk, url, args.wrk_seconds, pids)
    finally:
        stop.set()
    return summary, ended, await load


def paced_report(load: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """The paced load's figures: over its whole run and within wrk's window [t0, t1]."""
    sent = [t for t in load["sent"] if t is not None]
    in_window = sum(1 for t in sent if t0 <= t <= t1)
    latency = [a - s for s, a in zip(load["sent"], load["ack"], strict=True) if a and s]
    return {
        "type": PACED_TYPE,
        "sent": load["total"],
        "acked": load["acked"],
        "failures": load["failures"],
        "rate": load["rate"],
        "rate_in_wrk_window": round(in_window / (t1 - t0), 1) if t1 > t0 else None,
        "behind_schedule_max_ms": load["max_late_ms"],
        "ack_ms": _percentiles(latency),
    }


def throughput_run(args: argparse.Namespace, scenario: str, rnd: int, mode: str) -> dict[str, Any]:
    """One wrk run of ``scenario``, ``with`` or ``without`` the clients."""
    serve = Serve(f"wrk-{scenario}-{rnd}-{mode}", args.database_url)
    clients: Clients | None = None
    sampler: CpuSampler | None = None
    extra: dict[str, int] = {"loader": os.getpid()}
    load: dict[str, Any] | None = None
    try:
        if mode == "with":
            query = f"type={PACED_TYPE}" if scenario == "paced" else ""
            clients = Clients(serve.url, args.clients, 0, "count", query)
            extra["clients"] = clients.proc.pid
        sampler = CpuSampler(lambda: {**serve.named_pids(), **extra})
        if scenario == "paced":
            tag = f"tp{rnd}{mode}"
            summary, ended, load = asyncio.run(wrk_with_paced_load(serve.url, args, tag, extra))
        else:
            summary, ended = run_wrk(serve.url, args.wrk_seconds, extra)
        sampler.stop()
        if clients is None:
            streamed = None
        elif load is not None:  # every acknowledged change, within the grace period
            streamed = clients.finish(want=load["acked"], grace=args.grace)
        else:
            streamed = clients.finish()
    finally:
        if sampler is not None:
            sampler.stop()
        serve.stop()
    duration = int(summary["duration_us"]) / 1e6
    errors = sum(
        int(summary.get(k, 0))
        for k in ("connect_errors", "read_errors", "write_errors", "timeout_errors")
    )
    run: dict[str, Any] = {
        "round": rnd,
        "clients": mode,
        "rps": float(summary["rps"]),
        "non2xx": summary.get("non2xx"),
        "errors": errors,
        "wraps": summary.get("wraps"),
        "wrk_p99_ms": round(int(summary.get("lat_p99_us", 0)) / 1000, 1),
        # wrk's window only (its set-up, loading the deliveries, comes before it)
        "cpu_s": sampler.window(ended - duration, ended),
    }
    if load is not None:
        run["paced"] = paced_report(load, ended - duration, ended)
    if streamed is not None:
        counts = streamed["counts"]
        run["events_per_client"] = {"min": min(counts), "max": max(counts)}
        run["reconnects"] = streamed["reconnects"]
        if load is not None:
            # Every acknowledged paced change was committed before the clients were
            # stopped; more than were sent would be a change received twice.
            run["missed_max"] = max(load["acked"] - min(counts), 0)
            run["every_client_every_change"] = (
                min(counts) >= load["acked"] and max(counts) <= load["total"]
            )
            run["clients_complete_after_s"] = streamed["complete_after_s"]
    return run


def _fmt_cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1f}" for k, v in cpu.items())


def throughput_part(args: argparse.Namespace, scenario: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    ratios: list[float] = []
    for rnd in range(args.rounds):
        order = ["without", "with"] if rnd % 2 == 0 else ["with", "without"]
        pair: dict[str, float] = {}
        for mode in order:
            run = throughput_run(args, scenario, rnd, mode)
            runs.append(run)
            pair[mode] = run["rps"]
            line = f"  round {rnd} {mode:>7}: wrk {run['rps']:6.0f} req/s"
            if "paced" in run:
                paced = run["paced"]
                line += (
                    f"; paced {paced['rate_in_wrk_window']}/s, {paced['acked']} acked, "
                    f"{paced['failures']} failed, 2xx p99 {paced['ack_ms'].get('p99')} ms"
                )
            if "events_per_client" in run:
                got = run["events_per_client"]
                line += f"; clients got {got['min']}..{got['max']}"
                if "missed_max" in run:
                    line += f" (missed {run['missed_max']})"
            print(f"{line}\n      CPU s: {_fmt_cpu(run['cpu_s'])}", flush=True)
        ratios.append(round(pair["with"] / pair["without"], 3))
    without = [r["rps"] for r in runs if r["clients"] == "without"]
    with_ = [r["rps"] for r in runs if r["clients"] == "with"]
    result: dict[str, Any] = {
        "scenario": scenario,
        "runs": runs,
        "median_without": statistics.median(without),
        "median_with": statistics.median(with_),
        "spread_without": {"min": min(without), "max": max(without)},
        "spread_with": {"min": min(with_), "max": max(with_)},
        "round_ratios": ratios,
        "ratio": statistics.median(ratios),  # median of the per-round with/without ratios
        "ratio_of_medians": round(statistics.median(with_) / statistics.median(without), 3),
    }
    if scenario == "paced":
        result["every_client_every_change"] = all(
            r["every_client_every_change"] for r in runs if r["clients"] == "with"
        )
    return result


def print_latency(latency: dict[str, Any]) -> None:
    c2c = latency["commit_to_client_ms"] or {}
    rss = latency["rss_mb"]
    print(
        f"  achieved {latency['rate_achieved']}/s, {latency['acked']}/{latency['webhooks']} "
        f"acked; every client got every change: {latency['every_client_every_change']} "
        f"(missing {latency['missing']}, reconnects {latency['reconnects']})"
    )
    print(
        f"  commit->client ms: p50 {c2c.get('p50')} p90 {c2c.get('p90')} p99 {c2c.get('p99')} "
        f"max {c2c.get('max')} over {c2c.get('n')} deliveries"
    )
    print(f"  CPU s during the load: {latency['cpu_s_during_load']}")
    print(
        f"  server RSS MB: idle {rss['idle_with_clients']}, first third {rss['first_third_mean']},"
        f" last third {rss['last_third_mean']}, max {rss['max']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=int, default=1000, help="changes (webhooks) a second")
    parser.add_argument("--seconds", type=float, default=20, help="latency run length")
    parser.add_argument("--rounds", type=int, default=2, help="wrk runs of each kind")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument(
        "--throughput-scenario",
        default="paced",
        help="paced (the clients get --rate changes/s among wrk's), all (they stream "
        "everything wrk commits), or both: paced,all",
    )
    parser.add_argument(
        "--grace", type=float, default=5, help="s the clients get after wrk to catch up"
    )
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--database-url", default=None, help="PostgreSQL instead of SQLite")
    parser.add_argument("--client", nargs=5, metavar=("URL", "N", "EXPECT", "MODE", "OUT"))
    parser.add_argument("--client-query", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        url, n, expect, mode, out = args.client
        client_main(url, int(n), int(expect), mode, Path(out), query=args.client_query)
        return 0
    scenarios = [s for s in args.throughput_scenario.split(",") if s]
    if not scenarios or set(scenarios) - set(SCENARIOS):
        parser.error(f"--throughput-scenario: a comma-separated list of {', '.join(SCENARIOS)}")
    load_at_start = os.getloadavg()
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_at_start},
    }
    if not args.skip_latency:
        print(
            f"latency: {args.clients} clients, {args.rate} changes/s for {args.seconds:g} s "
            f"(load average now {load_at_start[0]:.1f} on {os.cpu_count()} CPUs)"
        )
        report["latency"] = latency = latency_part(args)
        print_latency(latency)
    status = 0
    if not args.skip_throughput:
        if shutil.which("wrk") is None or not DELIVERIES.exists():
            print("throughput: skipped (needs wrk and the deliveries of bench/webhook_bench.py)")
        else:
            report["throughput"] = {}
            for scenario in scenarios:
                what = (
                    f" + {args.rate} paced webhooks/s of type {PACED_TYPE}, the clients on "
                    f"?type={PACED_TYPE}"
                    if scenario == "paced"
                    else ", the clients on everything"
                )
                print(
                    f"throughput [{scenario}]: wrk -t1 -c32 -d{args.wrk_seconds}s{what}; "
                    f"rounds: {args.rounds}, alternating (load average "
                    f"{os.getloadavg()[0]:.1f})",
                    flush=True,
                )
                report["throughput"][scenario] = tp = throughput_part(args, scenario)
                print(
                    f"  wrk req/s without clients: median {tp['median_without']:.0f} (min "
                    f"{tp['spread_without']['min']:.0f}, max {tp['spread_without']['max']:.0f});"
                    f" with {args.clients} clients: median {tp['median_with']:.0f} (min "
                    f"{tp['spread_with']['min']:.0f}, max {tp['spread_with']['max']:.0f})\n"
                    f"  with/without: median of rounds {tp['ratio']} {tp['round_ratios']}, "
                    f"ratio of medians {tp['ratio_of_medians']}"
                )
                if tp.get("every_client_every_change") is False:
                    print("  FAILED: a client missed paced changes that were acknowledged")
                    status = 1
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sse.json").write_text(json.dumps(report, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
