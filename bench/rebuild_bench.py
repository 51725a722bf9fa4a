"""Rebuild of N stored events (default 1M): wall time and peak memory.

Fills a SQLite store with N realistic events (copies of the ``messy`` fixture's
lifecycles with fresh ids, as bench/ingest_bench.py makes them; cached in
bench/results/ between runs), then times ``phasewatch replay rebuild`` on it in a fresh
process and reads that process's peak RSS (VmHWM). Also reports the peak RSS of a
``--check`` pass, and the view's equality with what ingestion built.

With ``--postgres`` (a local PostgreSQL started for the run, ``fsync`` on) or
``--database-url ADMIN_URL``, the same N events also go into a fresh PostgreSQL database
(``PostgresStore.ingest`` in batches of ``--fill-batch``, then ``VACUUM ANALYZE`` as
autovacuum would do in time), and the rounds alternate SQLite and PostgreSQL rebuilds
(each a fresh process), reporting the medians and the per-round PostgreSQL/SQLite rate.

    .venv/bin/python bench/rebuild_bench.py [--events 1000000]
    .venv/bin/python bench/rebuild_bench.py --postgres --rounds 3 [--no-check]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def distinct_bodies(n: int) -> list[bytes]:
    from ingest_bench import make_bodies

    # The fixture's streams carry duplicates (resends): make N *distinct* events.
    bodies, seen = [], set()
    for body in make_bodies(int(n * 1.2)):
        event_id = body[7 : body.index(b'"', 7)]  # {"id":"<id>",...
        if event_id not in seen:
            seen.add(event_id)
            bodies.append(body)
    bodies = bodies[:n]
    assert len(bodies) == n, "not enough distinct events generated"
    return bodies


async def fill(db: Path, bodies: list[bytes]) -> None:
    from consumer.core.codec import decode
    from consumer.store.sqlite.store import SQLiteStore

    store = SQLiteStore(db, synchronous="NORMAL")
    await store.open()
    started = time.perf_counter()
    try:
        for i in range(0, len(bodies), 2000):
            await store.ingest([decode(b) for b in bodies[i : i + 2000]], "bench", 0)
    finally:
        await store.close()
    took = time.perf_counter() - started
    print(f"filled {db} with {len(bodies)} events in {took:.0f}s", file=sys.stderr)


async def fill_postgres(url: str, bodies: list[bytes], batch: int) -> None:
    import asyncpg

    from consumer.core.codec import decode
    from consumer.store.postgres.store import PostgresStore

    store = PostgresStore(url)
    await store.open()
    started = time.perf_counter()
    try:
        # Two batches in flight, as the live ingest pipelines them.
        pending: set[asyncio.Task[Any]] = set()
        for i in range(0, len(bodies), batch):
            events = [decode(b) for b in bodies[i : i + batch]]
            pending.add(asyncio.create_task(store.ingest(events, "bench", 0)))
            if len(pending) >= 2:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        for task in pending:
            await task
    finally:
        await store.close()
    took = time.perf_counter() - started
    con = await asyncpg.connect(url)
    try:
        await con.execute("VACUUM ANALYZE")
    finally:
        await con.close()
    print(
        f"filled PostgreSQL with {len(bodies)} events in {took:.0f}s"
        f" ({len(bodies) / took:,.0f}/s, batches of {batch}), then VACUUM ANALYZE",
        file=sys.stderr,
    )


async def child(db: Path | None, url: str | None, check: bool) -> dict[str, object]:
    from consumer.replay.rebuild import rebuild
    from consumer.store.postgres.store import PostgresStore
    from consumer.store.sqlite.store import SQLiteStore

    # As `phasewatch replay rebuild` opens them (open_store, not serving).
    store: PostgresStore | SQLiteStore
    if url:
        store = PostgresStore(url)
    else:
        assert db is not None
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


def run_child(kind: str, target: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *target],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{kind} {target[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def describe(backend: str, kind: str, result: dict[str, Any]) -> str:
    return (
        f"{backend:<8} {kind:<8} {result['events']:>9} events {result['tasks']:>7} tasks "
        f"in {result['seconds']:6.1f}s ({result['events'] / result['seconds']:,.0f}"
        f" events/s), peak RSS {result['peak_rss_mb']:.0f} MB,"
        f" differences {result['different'] + result['missing']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="skip the --check passes")
    parser.add_argument(
        "--postgres", action="store_true", help="a local PostgreSQL for the run (fsync on)"
    )
    parser.add_argument("--database-url", help="an existing PostgreSQL server (admin URL)")
    parser.add_argument("--fill-batch", type=int, default=5000)
    parser.add_argument("--child", choices=["rebuild", "check"])
    parser.add_argument("--db", type=Path)
    parser.add_argument("--url")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.db, args.url, args.child == "check"))))
        return
    from pg_local import bench_postgres, code_state

    from consumer.store.sqlite.schema import SCHEMA_VERSION

    # Keyed by schema: a database of another schema is refused at open.
    db = REPO / "bench" / "results" / f"rebuild-{args.events}-schema{SCHEMA_VERSION}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    with_pg = args.postgres or bool(args.database_url)
    bodies = None
    if not db.exists() or with_pg:
        bodies = distinct_bodies(args.events)
    if not db.exists():
        assert bodies is not None
        asyncio.run(fill(db, bodies))
    print(f"code: {code_state()}", file=sys.stderr)
    targets = {"sqlite": ["--db", str(db)]}
    kinds = [] if args.no_check else ["check"]
    kinds.append("rebuild")
    results: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        if with_pg:
            pg = stack.enter_context(bench_postgres(args.database_url))
            print(f"postgres: {pg.server_version()}", file=sys.stderr)
            url = pg.fresh("rebuild")
            assert bodies is not None
            asyncio.run(fill_postgres(url, bodies, args.fill_batch))
            targets["postgres"] = ["--url", url]
        del bodies
        backends = list(targets)
        for rnd in range(args.rounds):
            order = backends if rnd % 2 == 0 else backends[::-1]
            for backend in order:
                for kind in kinds:
                    result = run_child(kind, targets[backend])
                    results.setdefault(f"{backend} {kind}", []).append(result)
                    print(f"round {rnd} " + describe(backend, kind, result), flush=True)
    if with_pg:
        print(f"{args.events} events, {args.rounds} round(s), medians (events/s):")
        for key, rs in results.items():
            rates = [r["events"] / r["seconds"] for r in rs]
            print(
                f"  {key:<16} {statistics.median(rates):>9,.0f}"
                f"  ({', '.join(f'{x:,.0f}' for x in rates)}),"
                f" peak RSS {statistics.median(r['peak_rss_mb'] for r in rs):.0f} MB"
            )
        for kind in kinds:
            ratios = [
                (p["events"] / p["seconds"]) / (s["events"] / s["seconds"])
                for p, s in zip(results[f"postgres {kind}"], results[f"sqlite {kind}"], strict=True)
            ]
            print(
                f"  PostgreSQL/SQLite {kind}: median of per-round ratios"
                f" {statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)};"
                " goal >= 1)"
            )


if __name__ == "__main__":
    main()
