"""Rebuild of N stored events (default 1M): wall time and peak memory.

Fills a SQLite store with N realistic events (copies of the ``messy`` fixture's
lifecycles with fresh ids, as bench/ingest_bench.py makes them; cached in
bench/results/ between runs), then times ``phasewatch replay rebuild`` on it in a fresh
process and reads that process's peak RSS (VmHWM). Also reports the peak RSS of a
``--check`` pass, and the view's equality with what ingestion built.

    .venv/bin/python bench/rebuild_bench.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


async def fill(db: Path, n: int) -> None:
    from ingest_bench import make_bodies

    from consumer.core.codec import decode
    from consumer.store.sqlite.store import SQLiteStore

    store = SQLiteStore(db, synchronous="NORMAL")
    await store.open()
    started = time.perf_counter()
    try:
        # The fixture's streams carry duplicates (resends): make N *distinct* events.
        bodies, seen = [], set()
        for body in make_bodies(int(n * 1.2)):
            event_id = body[7 : body.index(b'"', 7)]  # {"id":"<id>",...
            if event_id not in seen:
                seen.add(event_id)
                bodies.append(body)
        bodies = bodies[:n]
        assert len(bodies) == n, "not enough distinct events generated"
        for i in range(0, n, 2000):
            await store.ingest([decode(b) for b in bodies[i : i + 2000]], "bench", 0)
    finally:
        await store.close()
    print(f"filled {db} with {n} events in {time.perf_counter() - started:.0f}s", file=sys.stderr)


async def child(db: Path, check: bool) -> dict[str, object]:
    from consumer.replay.rebuild import rebuild
    from consumer.store.sqlite.store import SQLiteStore

    store = SQLiteStore(db)
    await store.open()
    started = time.perf_counter()
    try:
        report = await rebuild(store, check=check)
    finally:
        await store.close()
    elapsed = time.perf_counter() - started
    status = Path("/proc/self/status").read_text()  # noqa: ASYNC240 - once, after the work
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
    return {
        "seconds": elapsed,
        "events": report.events,
        "tasks": report.tasks,
        "different": len(report.different),
        "missing": len(report.missing),
        "peak_rss_mb": int(hwm.split()[1]) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--child", choices=["rebuild", "check"])
    parser.add_argument("--db", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.db, args.child == "check"))))
        return
    from consumer.store.sqlite.schema import SCHEMA_VERSION

    # Keyed by schema: a database of another schema is refused at open.
    db = REPO / "bench" / "results" / f"rebuild-{args.events}-schema{SCHEMA_VERSION}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    if not db.exists():
        asyncio.run(fill(db, args.events))
    for kind in ("check", "rebuild"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--db", str(db)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{kind:<8} {result['events']:>9} events {result['tasks']:>7} tasks "
            f"in {result['seconds']:6.1f}s ({result['events'] / result['seconds']:,.0f}"
            f" events/s), peak RSS {result['peak_rss_mb']:.0f} MB,"
            f" differences {result['different'] + result['missing']}"
        )


if __name__ == "__main__":
    main()
