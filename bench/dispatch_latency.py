"""Latency from a webhook's 2xx to the handler's start, at a sustained rate.

Starts ``phasewatch serve`` (SQLite, ``synchronous=FULL``) with a no-op handler
(bench/latency_handler.py), then an open-loop client POSTs signed webhooks at a fixed
rate (default 1,000/s for 60 s), each one a task's first event, so each is a phase change
the handler receives. Latency per event = handler start - time the client received the
2xx (same machine, same clock). A negative value means the handler started before the
client had read its 2xx. Reports p50/p90/p99/max and the achieved rate.

``--postgres`` (a local PostgreSQL started for the run, ``fsync`` on) or ``--database-url
ADMIN_URL`` adds PostgreSQL: ``--backends sqlite,postgres`` (the default then) alternates
the backends round by round (``--rounds``), each run a fresh service and a fresh
database, and reports each round and the medians of the rounds' percentiles.

    .venv/bin/python bench/dispatch_latency.py [--rate 1000] [--seconds 60]
    .venv/bin/python bench/dispatch_latency.py --postgres --rounds 3 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
SECRET = b"whsec_bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def body_for(i: int, run: str) -> bytes:
    now = int(time.time() * 1000)
    task_id = f"lat-{run}-{i:07d}"
    snapshot = {
        "id": task_id,
        "type": "upload",
        "createdAt": now,
        "status": {"phase": "pending", "updatedAt": now},
    }
    return orjson.dumps(
        {
            "id": f"ev-{run}-{i:07d}",
            "webhookId": "bench",
            "createdAt": now,
            "timestamp": now,
            "event": "task.spawned",
            "payload": {"task": {"id": task_id, "type": "upload", "snapshot": snapshot}},
        }
    )


async def drive(url: str, rate: int, seconds: int, run: str) -> tuple[dict[str, int], int]:
    acked: dict[str, int] = {}
    errors = 0
    total = rate * seconds
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            nonlocal errors
            body = body_for(i, run)
            t = int(time.time() * 1000)
            sig = f"t={t},v1={hmac.new(SECRET, body, hashlib.sha256).hexdigest()}"
            try:
                async with session.post(
                    url,
                    data=body,
                    headers={"Livepeer-Signature": sig, "Content-Type": "application/json"},
                ) as r:
                    await r.read()
                    if r.status == 200:
                        acked[f"ev-{run}-{i:07d}"] = time.time_ns()
                    else:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

        start = time.perf_counter()
        pending = set()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.add(asyncio.create_task(one(i)))
            if len(pending) > 2000:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
    print(
        f"sent {total} in {elapsed:.1f}s ({total / elapsed:.0f}/s), errors {errors}",
        file=sys.stderr,
    )
    return acked, errors


def run_once(
    db_url: str, rate: int, seconds: int, timeline: Path | None = None
) -> dict[str, float]:
    """One service on ``db_url`` driven at ``rate`` for ``seconds``: its percentiles."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        out = Path(tmp) / "starts.jsonl"
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}:{REPO / 'bench'}",
            "PHASEWATCH_DATABASE_URL": db_url.replace("{tmp}", tmp),
            "PHASEWATCH_HTTP_PORT": str(port),
            "PHASEWATCH_WEBHOOK_SECRET": SECRET.decode(),
            "PHASEWATCH_HANDLERS": "latency_handler:noop",
            "PHASEWATCH_BENCH_LATENCY_OUT": str(out),
            "PHASEWATCH_LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen([str(REPO / ".venv/bin/phasewatch"), "serve"], env=env)
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            run = os.urandom(3).hex()
            acked, errors = asyncio.run(
                drive(f"http://127.0.0.1:{port}/webhooks/livepeer", rate, seconds, run)
            )
            time.sleep(2)  # let the last handler calls start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        starts = {eid: t for eid, t in (orjson.loads(x) for x in out.read_bytes().splitlines())}
    if timeline is not None:
        # Each event's 2xx time and latency, to see when in the run the slow ones fall.
        with timeline.open("ab") as f:
            for e, t in sorted(acked.items(), key=lambda kv: kv[1]):
                if e in starts:
                    f.write(orjson.dumps([t, (starts[e] - t) / 1e6]) + b"\n")
    lat = sorted((starts[e] - t) / 1e6 for e, t in acked.items() if e in starts)
    missing = len(acked) - len(lat)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))]

    return {
        "measured": len(lat),
        "missing": missing,
        "errors": errors,
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": lat[-1],
        "mean": statistics.fmean(lat),
        "negative": sum(x < 0 for x in lat),
    }


def describe(r: dict[str, float]) -> str:
    return (
        f"p50 {r['p50']:.1f}  p90 {r['p90']:.1f}  p99 {r['p99']:.1f}"
        f"  max {r['max']:.1f}  mean {r['mean']:.1f}  (negative: {r['negative']},"
        f" measured {r['measured']}, missing {r['missing']}, errors {r['errors']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--postgres", action="store_true", help="a local PostgreSQL for the run (fsync on)"
    )
    parser.add_argument("--database-url", help="an existing PostgreSQL server (admin URL)")
    parser.add_argument(
        "--backends", help="comma-separated, of sqlite and postgres (default: what is given)"
    )
    parser.add_argument(
        "--timeline", type=Path, help="append each event's [2xx ns, latency ms] here (jsonl)"
    )
    args = parser.parse_args()
    with_pg = args.postgres or bool(args.database_url)
    backends = (args.backends or ("sqlite,postgres" if with_pg else "sqlite")).split(",")
    if "postgres" in backends and not with_pg:
        parser.error("--backends postgres needs --postgres or --database-url")
    sys.path.insert(0, str(REPO / "bench"))
    from pg_local import bench_postgres, code_state

    results: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(bench_postgres(args.database_url)) if with_pg else None
        if pg is not None:
            print(f"postgres: {pg.server_version()}")
        print(f"code: {code_state()}")
        for rnd in range(args.rounds):
            order = backends if rnd % 2 == 0 else backends[::-1]
            for backend in order:
                if backend == "postgres":
                    assert pg is not None
                    url = pg.fresh("latency")
                else:
                    url = "sqlite:///{tmp}/lat.db"
                r = run_once(url, args.rate, args.seconds, args.timeline)
                if backend == "postgres":
                    assert pg is not None
                    pg.drop(url)
                results[backend].append(r)
                print(f"round {rnd} {backend:<8} 2xx -> handler start, ms: {describe(r)}")
    print(f"at {args.rate}/s for {args.seconds}s, {args.rounds} round(s), medians of rounds:")
    for backend, rs in results.items():
        p99s = ", ".join(format(r["p99"], ".1f") for r in rs)
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(
            f"  {backend:<8} 2xx -> handler start, ms: p50 {med['p50']:.1f}  p90 {med['p90']:.1f}"
            f"  p99 {med['p99']:.1f}  max {med['max']:.1f}"
            f"  (p99 per round: {p99s}; goal p99 < 50)"
        )


if __name__ == "__main__":
    main()
