"""In-process ingestion throughput: decode + fold + store commit, no HTTP.

Replays realistic events (copies of the ``messy`` fixture's 500 lifecycles with fresh task
and event ids, shuffled within a window as real delivery is) through ``Store.ingest`` in
batches, for each backend, and compares against a floor: appending the same raw bodies to
a SQLite table in the same batches (what durability alone costs). Medians of R rounds.

    .venv/bin/python bench/ingest_bench.py [--events 200000] [--batch 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import gen_deliveries  # noqa: E402

from consumer.core.codec import decode  # noqa: E402
from consumer.store.base import Store  # noqa: E402
from consumer.store.memory import MemoryStore  # noqa: E402
from consumer.store.sqlite.store import SQLiteStore  # noqa: E402

FIXTURE = REPO.parent / "shared" / "fixtures" / "messy" / "deliveries.jsonl"


def make_bodies(n: int, seed: int = 1) -> list[bytes]:
    """N realistic bodies: copies of the messy fixture's lifecycles with fresh random ids
    and times moved forward by one template period per copy (``gen_deliveries``), so ids
    are as random and times as increasing as in live traffic."""
    params = gen_deliveries.Params(n=n, seed=seed)
    template = gen_deliveries.load_template(FIXTURE)
    out = [raw.encode() for _, raw, _ in gen_deliveries.generate(template, params)]
    rng = random.Random(seed)
    # Local reordering, as fan-out and retries do; keeps lifecycles roughly in time.
    for i in range(0, len(out), 64):
        window = out[i : i + 64]
        rng.shuffle(window)
        out[i : i + 64] = window
    return out


async def run_store(store: Store, bodies: list[bytes], batch: int) -> float:
    await store.open()
    try:
        started = time.perf_counter()
        for i in range(0, len(bodies), batch):
            events = [decode(b) for b in bodies[i : i + batch]]
            await store.ingest(events, "bench", 0)
        return len(bodies) / (time.perf_counter() - started)
    finally:
        await store.close()


async def run_floor(path: Path, bodies: list[bytes], batch: int, synchronous: str) -> float:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute(f"PRAGMA synchronous = {synchronous}")
    con.execute("CREATE TABLE raw (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    started = time.perf_counter()
    for i in range(0, len(bodies), batch):
        con.execute("BEGIN IMMEDIATE")
        con.executemany("INSERT INTO raw (body) VALUES (?)", [(b,) for b in bodies[i : i + batch]])
        con.execute("COMMIT")
    rate = len(bodies) / (time.perf_counter() - started)
    con.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bodies = make_bodies(args.events)
    cases: dict[str, Callable[[Path], Coroutine[Any, Any, float]]] = {
        "floor: raw append, SQLite FULL": lambda d: run_floor(
            d / "f.db", bodies, args.batch, "FULL"
        ),
        "phasewatch SQLite (synchronous=FULL)": lambda d: run_store(
            SQLiteStore(d / "s.db"), bodies, args.batch
        ),
        "phasewatch SQLite (synchronous=NORMAL)": lambda d: run_store(
            SQLiteStore(d / "n.db", synchronous="NORMAL"), bodies, args.batch
        ),
        "phasewatch memory": lambda d: run_store(MemoryStore(), bodies, args.batch),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():  # interleaved rounds: noise hits every case alike
            with tempfile.TemporaryDirectory() as tmp:
                rates[name].append(asyncio.run(case(Path(tmp))))
    floor = statistics.median(rates["floor: raw append, SQLite FULL"])
    print(f"{args.events} events, batch {args.batch}, {args.rounds} rounds (median events/s)")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:<40} {med:>10,.0f}   x{med / floor:.2f} of floor")


if __name__ == "__main__":
    main()
