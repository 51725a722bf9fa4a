"""Kafka consumption: phasewatch's materialized events/s against a bare aiokafka loop.

One pre-filled topic of N realistic events (copies of the ``messy`` fixture's lifecycles
with fresh ids, keyed by task id, 3 partitions). In the same run, alternating:

* **bare**: a consumer-group ``getmany`` loop that ``orjson.loads`` each value, nothing else;
* **phasewatch**: ``KafkaSource`` into a fresh SQLite store (``synchronous=FULL``): decode,
  fold, one store transaction per batch, offsets committed after it.

Each run is its own process (peak RSS is per process) with a fresh consumer group, and is
timed from the first record to the last. Medians over rounds; ratio = phasewatch / bare.

    .venv/bin/python bench/kafka_bench.py [--events 1000000] [--rounds 1]
        [--bootstrap HOST:PORT]   # default: start deploy/kafka_local.py on free ports
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
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


async def fill(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from ingest_bench import make_bodies

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
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
        f"filled {topic} with {n} events in {time.perf_counter() - started:.1f}s", file=sys.stderr
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


async def run_phasewatch(bootstrap: str, topic: str, n: int, db: Path) -> dict[str, Any]:
    from consumer.settings import Settings
    from consumer.sources.kafka.group import KafkaSource
    from consumer.store.sqlite.process import SQLiteProcessStore
    from consumer.store.sqlite.store import SQLiteStore

    # As `serve` runs it by default: folds and commits in the writer process.
    store = SQLiteProcessStore(db) if WRITER == "process" else SQLiteStore(db)
    await store.open()
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        kafka_topics=topic,
        kafka_group_id=f"pw-{uuid.uuid4().hex[:8]}",
    )
    source = KafkaSource(store, settings.kafka_connection(), settings.kafka_source())
    await source.start()
    first = 0.0
    try:
        while source.stats.records < n:
            if not first and source.stats.records:
                # First batch landed: back-date to its start as well as we can observe.
                first = time.perf_counter()
                first_records = source.stats.records
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - first
        counted = source.stats.records - first_records
    finally:
        await source.stop()
        stats = await store.stats()
        await store.close()
    return {
        "rate": counted / elapsed,
        "seconds": elapsed,
        "peak_rss_mb": _peak_rss_mb(),
        "events_stored": stats.events,
        "tasks": stats.tasks,
    }


WRITER = "process"


def child(kind: str, bootstrap: str, topic: str, n: int) -> dict[str, Any]:
    cmd = [
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
    ]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, timeout=3600)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def load_kafka_local() -> Any:
    spec = importlib.util.spec_from_file_location("kafka_local", REPO / "deploy" / "kafka_local.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kafka_local"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--bootstrap")
    parser.add_argument("--topic")
    parser.add_argument("--child", choices=["bare", "phasewatch"])
    parser.add_argument(
        "--writer",
        choices=["process", "thread"],
        default="process",
        help="where phasewatch folds and commits (serve's default: process)",
    )
    args = parser.parse_args()
    global WRITER  # noqa: PLW0603 - one setting for the children this run starts
    WRITER = args.writer

    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            if args.child == "bare":
                result = asyncio.run(run_bare(args.bootstrap, args.topic, args.events))
            else:
                result = asyncio.run(
                    run_phasewatch(args.bootstrap, args.topic, args.events, Path(tmp) / "bench.db")
                )
        print(json.dumps(result))
        return

    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = load_kafka_local().LocalKafka()
        bootstrap = broker.start()
    try:
        topic = args.topic or f"bench-{uuid.uuid4().hex[:8]}"
        if not args.topic:
            asyncio.run(fill(bootstrap, topic, args.events))
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "phasewatch": []}
        for round_no in range(args.rounds):
            order = ["bare", "phasewatch"] if round_no % 2 == 0 else ["phasewatch", "bare"]
            for kind in order:
                runs[kind].append(child(kind, bootstrap, topic, args.events))
                print(f"round {round_no + 1} {kind}: {runs[kind][-1]}", file=sys.stderr)
    finally:
        if broker is not None:
            broker.close()
    bare = statistics.median(r["rate"] for r in runs["bare"])
    pw = statistics.median(r["rate"] for r in runs["phasewatch"])
    ratios = [p["rate"] / b["rate"] for p, b in zip(runs["phasewatch"], runs["bare"], strict=True)]
    print(f"{args.events} events, {args.rounds} round(s), medians")
    print(
        f"  bare aiokafka loop (getmany + orjson.loads) {bare:>10,.0f} events/s"
        f"  peak RSS {statistics.median(r['peak_rss_mb'] for r in runs['bare']):.0f} MB"
    )
    print(
        f"  phasewatch KafkaSource -> SQLite ({WRITER:<7})  {pw:>10,.0f} events/s"
        f"  peak RSS {statistics.median(r['peak_rss_mb'] for r in runs['phasewatch']):.0f} MB"
    )
    print(f"  ratio phasewatch/bare: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
