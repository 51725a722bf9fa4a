"""Kafka consumption: phasewatch's materialized events/s against a bare aiokafka loop.

One pre-filled topic of N realistic events (copies of the ``messy`` fixture's lifecycles
with fresh ids, keyed by task id, 3 partitions). In the same run, alternating:

* **bare**: a consumer-group ``getmany`` loop that ``orjson.loads`` each value, nothing else;
* **phasewatch**: ``KafkaSource`` into a fresh SQLite store (``synchronous=FULL``): decode,
  fold, one store transaction per batch, offsets committed after it.

With ``--postgres`` (a local PostgreSQL started for the run, ``fsync`` on; or
``--database-url ADMIN_URL``), two more contenders in the same rounds:

* **postgres**: ``KafkaSource`` into a fresh PostgreSQL database (one process);
* **postgres-x2** (``--pg-consumers 2``): two such processes in one consumer group, into
  one fresh database, timed from the first record either saw to the moment their records
  add up to N (each writes its count to a file the other reads). A rebalance can hand
  a partition over before its offsets are committed, so a few records may be seen twice:
  the report gives the events stored as well.

Each run is its own process (peak RSS is per process) with a fresh consumer group, and is
timed from the first record to the last. Medians over rounds; ratio = contender / bare,
and PostgreSQL / SQLite per round.

    .venv/bin/python bench/kafka_bench.py [--events 1000000] [--rounds 1]
        [--bootstrap HOST:PORT]   # default: start deploy/kafka_local.py on free ports
    .venv/bin/python bench/kafka_bench.py --events 300000 --rounds 3 --postgres --pg-consumers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: the latter survives exec, so a child would report its parent's.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def fill(bootstrap: str, topic: str, n: int, partitions: int = 3) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from ingest_bench import make_bodies

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    bodies = make_bodies(n)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        compression_type=None,
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for body in bodies:
            key = orjson.loads(body)["payload"]["task"]["id"].encode()
            pending.append(await producer.send(topic, value=body, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    print(
        f"filled {topic} ({partitions} partitions) with {n} events"
        f" in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )


async def run_bare(bootstrap: str, topic: str, n: int) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bare-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=2000,
    )
    await consumer.start()
    seen = 0
    first = 0.0
    try:
        while seen < n:
            data = await consumer.getmany(timeout_ms=1000, max_records=2000)
            for records in data.values():
                if not first:
                    first = time.perf_counter()
                for record in records:
                    orjson.loads(record.value)
                seen += len(records)
        elapsed = time.perf_counter() - first
    finally:
        await consumer.stop()
    return {"rate": seen / elapsed, "seconds": elapsed, "peak_rss_mb": _peak_rss_mb()}


class Peers:
    """Record counts shared by the consumers of one multi-process run, through files
    (one per consumer, rewritten atomically): the run ends when they add up to N."""

    def __init__(self, directory: Path, me: int) -> None:
        self.directory = directory
        self.mine = directory / f"count-{me}"
        self._tmp = directory / f".count-{me}"

    def publish(self, records: int) -> None:
        self._tmp.write_text(str(records))
        os.replace(self._tmp, self.mine)

    def total(self) -> int:
        total = 0
        for path in self.directory.glob("count-*"):
            with contextlib.suppress(OSError, ValueError):
                total += int(path.read_text())
        return total


async def run_phasewatch(
    bootstrap: str,
    topic: str,
    n: int,
    db: Path,
    *,
    db_url: str | None = None,
    group: str | None = None,
    peers: Peers | None = None,
) -> dict[str, Any]:
    from consumer.settings import Settings
    from consumer.sources.kafka.group import KafkaSource
    from consumer.store.base import Store
    from consumer.store.postgres.store import PostgresStore
    from consumer.store.sqlite.process import SQLiteProcessStore
    from consumer.store.sqlite.store import SQLiteStore

    store: Store
    if db_url is not None:
        store = PostgresStore(db_url)  # as `serve` opens it: pool of 10, migrate
    else:
        # As `serve` runs it by default: folds and commits in the writer process.
        store = SQLiteProcessStore(db) if WRITER == "process" else SQLiteStore(db)
    await store.open()
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        kafka_topics=topic,
        kafka_group_id=group or f"pw-{uuid.uuid4().hex[:8]}",
    )
    source = KafkaSource(store, settings.kafka_connection(), settings.kafka_source())
    await source.start()
    first = 0.0
    first_wall = 0.0
    first_records = 0
    try:
        while True:
            records = source.stats.records
            if peers is not None:
                peers.publish(records)
                if peers.total() >= n:
                    break
            elif records >= n:
                break
            if not first and records:
                # First batch landed: back-date to its start as well as we can observe.
                first = time.perf_counter()
                first_wall = time.time()
                first_records = records
            await asyncio.sleep(0.005)
        end_wall = time.time()
        elapsed = time.perf_counter() - first if first else 0.0
        counted = source.stats.records - first_records
    finally:
        await source.stop()
        stats = await store.stats()
        await store.close()
    return {
        "rate": counted / elapsed if elapsed else 0.0,
        "seconds": elapsed,
        "records": source.stats.records,
        "first_wall": first_wall,
        "end_wall": end_wall,
        "first_records": first_records,
        "peak_rss_mb": _peak_rss_mb(),
        "events_stored": stats.events,
        "tasks": stats.tasks,
    }


WRITER = "process"


def _child_cmd(kind: str, bootstrap: str, topic: str, n: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--events",
        str(n),
        "--writer",
        WRITER,
        *extra,
    ]


def child(kind: str, bootstrap: str, topic: str, n: int, *extra: str) -> dict[str, Any]:
    cmd = _child_cmd(kind, bootstrap, topic, n, *extra)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, timeout=3600)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def children(bootstrap: str, topic: str, n: int, db_url: str, count: int) -> dict[str, Any]:
    """``count`` phasewatch consumers in one group into one database, at once."""
    group = f"pwx-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as peer_dir:
        procs = [
            subprocess.Popen(
                _child_cmd(
                    "phasewatch",
                    bootstrap,
                    topic,
                    n,
                    "--db-url",
                    db_url,
                    "--group",
                    group,
                    "--peer-dir",
                    peer_dir,
                    "--peer-id",
                    str(i),
                ),
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(count)
        ]
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=3600)
            if proc.returncode:
                raise subprocess.CalledProcessError(proc.returncode, proc.args, out)
            results.append(json.loads(out.strip().splitlines()[-1]))
    started = [r for r in results if r["first_wall"]]
    first = min(r["first_wall"] for r in started)
    end = max(r["end_wall"] for r in results)
    # Records before the first observation of the earliest consumer are not timed.
    counted = sum(r["records"] for r in results) - min(
        r["first_records"] for r in started if r["first_wall"] == first
    )
    return {
        "rate": counted / (end - first),
        "seconds": end - first,
        "records": sum(r["records"] for r in results),
        "per_consumer_records": [r["records"] for r in results],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "events_stored": max(r["events_stored"] for r in results),
        "tasks": max(r["tasks"] for r in results),
    }


def load_kafka_local() -> Any:
    spec = importlib.util.spec_from_file_location("kafka_local", REPO / "deploy" / "kafka_local.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kafka_local"] = module
    spec.loader.exec_module(module)
    return module


def run_child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if args.child == "bare":
            result = asyncio.run(run_bare(args.bootstrap, args.topic, args.events))
        else:
            peers = None
            if args.peer_dir is not None:
                peers = Peers(args.peer_dir, args.peer_id)
            result = asyncio.run(
                run_phasewatch(
                    args.bootstrap,
                    args.topic,
                    args.events,
                    Path(tmp) / "bench.db",
                    db_url=args.db_url,
                    group=args.group,
                    peers=peers,
                )
            )
    print(json.dumps(result))


def report(
    args: argparse.Namespace, kinds: list[str], runs: dict[str, list[dict[str, Any]]]
) -> None:
    labels = {
        "bare": "bare aiokafka loop (getmany + orjson.loads)",
        "phasewatch": f"phasewatch KafkaSource -> SQLite ({WRITER})",
        "postgres": "phasewatch KafkaSource -> PostgreSQL",
        f"postgres-x{args.pg_consumers}": (
            f"{args.pg_consumers} phasewatch consumers (one group) -> one PostgreSQL"
        ),
    }
    print(f"{args.events} events, {args.rounds} round(s), medians")
    for kind in kinds:
        rates = [r["rate"] for r in runs[kind]]
        print(
            f"  {labels[kind]:<56} {statistics.median(rates):>10,.0f} events/s"
            f"  peak RSS {statistics.median(r['peak_rss_mb'] for r in runs[kind]):.0f} MB"
            f"  rounds {', '.join(f'{x:,.0f}' for x in rates)}"
        )
    for kind in kinds[1:]:
        ratios = [p["rate"] / b["rate"] for p, b in zip(runs[kind], runs["bare"], strict=True)]
        print(
            f"  ratio {kind}/bare: {statistics.median(ratios):.2f}"
            f" ({', '.join(f'{x:.2f}' for x in ratios)})"
        )
    if "phasewatch" in runs:
        for kind in [k for k in kinds if k.startswith("postgres")]:
            ratios = [
                p["rate"] / s["rate"] for p, s in zip(runs[kind], runs["phasewatch"], strict=True)
            ]
            print(
                f"  ratio {kind}/SQLite: {statistics.median(ratios):.2f}"
                f" ({', '.join(f'{x:.2f}' for x in ratios)}; goal >= 1)"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic")
    parser.add_argument("--child", choices=["bare", "phasewatch"])
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="add a PostgreSQL contender (a local server started for the run, fsync on)",
    )
    parser.add_argument(
        "--database-url", help="add PostgreSQL contenders on this server (admin URL)"
    )
    parser.add_argument(
        "--pg-consumers",
        type=int,
        default=1,
        help="also run this many consumer processes in one group into one database (>= 2)",
    )
    parser.add_argument(
        "--pg-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for each fresh database (ALTER DATABASE ... SET); repeatable",
    )
    parser.add_argument(
        "--no-sqlite", action="store_true", help="skip the SQLite contender (phasewatch)"
    )
    parser.add_argument("--db-url", help=argparse.SUPPRESS)  # child: PostgreSQL database
    parser.add_argument("--group", help=argparse.SUPPRESS)  # child: consumer group
    parser.add_argument("--peer-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--peer-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--writer",
        choices=["process", "thread"],
        default="process",
        help="where phasewatch folds and commits (serve's default: process)",
    )
    return parser.parse_args()


def contenders(args: argparse.Namespace) -> list[str]:
    kinds = ["bare"] + ([] if args.no_sqlite else ["phasewatch"])
    if args.postgres or args.database_url:
        kinds.append("postgres")
        if args.pg_consumers >= 2:
            kinds.append(f"postgres-x{args.pg_consumers}")
    return kinds


def main() -> None:
    args = parse_args()
    global WRITER  # noqa: PLW0603 - one setting for the children this run starts
    WRITER = args.writer

    if args.child:
        run_child(args)
        return

    from pg_local import bench_postgres, code_state

    kinds = contenders(args)
    with_pg = any(k.startswith("postgres") for k in kinds)
    broker = None
    bootstrap = args.bootstrap
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(bench_postgres(args.database_url)) if with_pg else None
        if pg is not None:
            print(f"postgres: {pg.server_version()}", file=sys.stderr)
        print(f"code: {code_state()}", file=sys.stderr)
        if args.pg_set:
            print(f"postgres databases set: {', '.join(args.pg_set)}", file=sys.stderr)
        if not bootstrap:
            broker = load_kafka_local().LocalKafka()
            bootstrap = broker.start()
            stack.callback(broker.close)
        topic = args.topic or f"bench-{uuid.uuid4().hex[:8]}"
        if not args.topic:
            asyncio.run(fill(bootstrap, topic, args.events))
        for round_no in range(args.rounds):
            order = kinds if round_no % 2 == 0 else kinds[::-1]
            for kind in order:
                if kind in ("bare", "phasewatch"):
                    result = child(kind, bootstrap, topic, args.events)
                else:
                    assert pg is not None
                    url = pg.fresh(f"kafka_{kind}")
                    pg.configure(url, args.pg_set)
                    if kind == "postgres":
                        result = child("phasewatch", bootstrap, topic, args.events, "--db-url", url)
                    else:
                        result = children(bootstrap, topic, args.events, url, args.pg_consumers)
                    result["counts"] = pg.counts(url)
                    pg.drop(url)
                runs[kind].append(result)
                print(f"round {round_no + 1} {kind}: {result}", file=sys.stderr)
    report(args, kinds, runs)


if __name__ == "__main__":
    main()
