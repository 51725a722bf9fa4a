"""The changes stream under load: 100 SSE clients on ``GET /changes/stream`` while
webhooks commit 1,000 phase changes a second, against a real ``phasewatch serve``.

Two parts, each on a fresh server and a fresh SQLite file (``--database-url`` for an
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
   the pre-signed deliveries of ``bench/webhook_bench.py``) for ``--wrk-seconds`` at
   ``-t1 -c32``, alternating runs without and with the 100 clients streaming everything
   it commits, ``--rounds`` times each.

Goals (issue #14): p99 commit->client under 100 ms, RSS flat, webhook throughput with
clients within noise of without. Results: a summary on stdout and
``bench/results/sse.json``. Everything listens on 127.0.0.1. The machine running it
runs the clients and the load too: on a small machine they compete with the server for
the same cores, which is part of what the numbers show.

    .venv/bin/python bench/sse_bench.py                       # 100 clients, 1000/s, 20 s
    .venv/bin/python bench/sse_bench.py --seconds 10 --rounds 1 --wrk-seconds 8
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
import urllib.request
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def sign(body: bytes) -> str:
    t = int(time.time() * 1000)
    digest = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


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

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of the server and of its children."""
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for k, pid in enumerate(self.pids()):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out["serve" if k == 0 else f"child{k}"] = (int(fields[11]) + int(fields[12])) / tick
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

    def __init__(self, url: str, n: int, expect: int, mode: str) -> None:
        self.out = Path(tempfile.mkstemp(prefix="pwsse-clients-", suffix=".json")[1])
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client", url, str(n), str(expect), mode, str(self.out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"clients did not connect: {line!r}")

    def finish(self, acks: Path | None = None, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"done {acks or '-'}\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout + 30)
        result: dict[str, Any] = json.loads(self.out.read_text())
        self.out.unlink()
        return result


class _Streams:
    """The client process's ``n`` streams from ``after=now``. ``latency``: note when
    each sampled ``lat-<i>`` change arrived at each client; ``count``: count change
    events. A stream that ends reconnects with its Last-Event-ID (counted)."""

    def __init__(self, url: str, n: int, expect: int, mode: str) -> None:
        self.url, self.n, self.expect, self.mode = url, n, expect, mode
        self.arrivals = [array.array("d", [0.0]) * max(expect, 1) for _ in range(n)]
        self.counts = [0] * n
        self.reconnects = 0
        self.duplicates = 0
        self.complete = 0  # clients with every expected change

    async def run(self) -> str:
        """Connect, say ``ready``; on ``done <acks>`` (stdin) wait (up to 60 s, latency
        mode) for every client to have every change; the acks path."""
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
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if self.mode == "latency":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.all_in.wait(), 60)
            self.stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        words = line.split()
        return words[1] if len(words) > 1 else "-"

    async def stream(self, k: int, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        last: str | None = None
        first = True
        while not self.stop.is_set():
            params = {"after": "now"} if last is None else {}
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
            if before < self.expect <= self.counts[k]:
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


def client_main(url: str, n: int, expect: int, mode: str, out: Path) -> None:
    streams = _Streams(url, n, expect, mode)
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


async def paced_load(url: str, rate: int, seconds: float, tag: str) -> dict[str, Any]:
    """``rate`` webhooks a second for ``seconds``: each a new task's first event."""
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    sent: list[float | None] = [None] * total
    ack: list[float | None] = [None] * total
    failures = 0
    inflight = asyncio.Semaphore(256)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal failures
        now_ms = int(time.time() * 1000)
        task_id = f"sse-{tag}-{i}"
        body = orjson.dumps(
            {
                "id": f"lat-{i}",
                "webhookId": "wh-bench",
                "createdAt": now_ms,
                "timestamp": now_ms,
                "event": "task.spawned",
                "payload": {
                    "task": {
                        "id": task_id,
                        "type": "upload",
                        "snapshot": {
                            "id": task_id,
                            "type": "upload",
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
        for i in range(total):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(session, i))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        elapsed = loop.time() - start
    acked = sum(1 for a in ack if a is not None)
    return {
        "sent": sent,
        "ack": ack,
        "total": total,
        "acked": acked,
        "failures": failures,
        "rate": round(total / elapsed, 1),
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


def run_wrk(url: str, seconds: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "PHASEWATCH_BENCH_DELIVERIES": str(DELIVERIES),
        "PHASEWATCH_BENCH_THREADS": "1",
        "PHASEWATCH_BENCH_OFFSET": "0",
    }
    done = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", "--timeout=10s", "-s", str(LUA), url],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    summary: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "PWBENCH":
            summary = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    if not summary:
        raise RuntimeError(f"no PWBENCH summary from wrk:\n{done.stdout}\n{done.stderr}")
    return summary


def throughput_part(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = ["without", "with"] if rnd % 2 == 0 else ["with", "without"]
        for mode in order:
            serve = Serve(f"wrk-{rnd}-{mode}", args.database_url)
            clients = None
            try:
                if mode == "with":
                    clients = Clients(serve.url, args.clients, 0, "count")
                cpu0 = serve.cpu_s()
                summary = run_wrk(serve.url, args.wrk_seconds)
                cpu1 = serve.cpu_s()
                streamed = clients.finish() if clients is not None else None
            finally:
                serve.stop()
            errors = sum(
                int(summary.get(k, 0))
                for k in ("connect_errors", "read_errors", "write_errors", "timeout_errors")
            )
            run = {
                "round": rnd,
                "clients": mode,
                "rps": float(summary["rps"]),
                "non2xx": summary.get("non2xx"),
                "errors": errors,
                "wraps": summary.get("wraps"),
                "server_cpu_s": {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items()},
            }
            if streamed is not None:
                counts = streamed["counts"]
                run["events_per_client"] = {"min": min(counts), "max": max(counts)}
                run["reconnects"] = streamed["reconnects"]
                run["clients_cpu_s"] = streamed["cpu_s"]
            runs.append(run)
            print(
                f"  wrk round {rnd} {mode:>7} clients: {run['rps']:8.0f} webhooks/s; CPU s: "
                f"server {run['server_cpu_s']}, clients {run.get('clients_cpu_s', '-')}",
                flush=True,
            )
    without = [r["rps"] for r in runs if r["clients"] == "without"]
    with_ = [r["rps"] for r in runs if r["clients"] == "with"]
    return {
        "runs": runs,
        "median_without": statistics.median(without),
        "median_with": statistics.median(with_),
        "ratio": round(statistics.median(with_) / statistics.median(without), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=int, default=1000, help="changes (webhooks) a second")
    parser.add_argument("--seconds", type=float, default=20, help="latency run length")
    parser.add_argument("--rounds", type=int, default=2, help="wrk runs of each kind")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--database-url", default=None, help="PostgreSQL instead of SQLite")
    parser.add_argument("--client", nargs=5, metavar=("URL", "N", "EXPECT", "MODE", "OUT"))
    args = parser.parse_args()
    if args.client:
        url, n, expect, mode, out = args.client
        client_main(url, int(n), int(expect), mode, Path(out))
        return 0
    load_at_start = os.getloadavg()
    print(
        f"latency: {args.clients} clients, {args.rate} changes/s for {args.seconds:g} s "
        f"(load average now {load_at_start[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    latency = latency_part(args)
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
    report: dict[str, Any] = {
        "latency": latency,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_at_start},
    }
    if not args.skip_throughput:
        if shutil.which("wrk") is None or not DELIVERIES.exists():
            print("throughput: skipped (needs wrk and the deliveries of bench/webhook_bench.py)")
        else:
            print(f"throughput: wrk -t1 -c32 -d{args.wrk_seconds}s, alternating, x{args.rounds}")
            report["throughput"] = tp = throughput_part(args)
            print(
                f"  median webhooks/s without clients {tp['median_without']:.0f}, with "
                f"{args.clients} clients {tp['median_with']:.0f} (ratio {tp['ratio']})"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sse.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
