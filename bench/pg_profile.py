"""Where a webhook's time goes on PostgreSQL: CPU per request by process, statement wall
times, and (``--cprofile``) the serving process's profile.

Runs ``phasewatch serve`` (through a wrapper: this file with ``--serve``) on SQLite and
on a fresh PostgreSQL database, alternating, each driven by wrk as
``bench/webhook_bench.py`` drives it. For each run it reads, from ``/proc``, the CPU
time spent during the run by the service's process tree, by the PostgreSQL server (the
postmaster, its live backends and the ones it reaped) and by wrk, and reports them in
microseconds per request. The wrapper also times, per call, ``PostgresStore.ingest`` (one
transaction: pool acquire to COMMIT) and each statement asyncpg runs (by its first
words), and the batch sizes; with ``--cprofile`` it profiles the whole service process
(cProfile: the relative split, not the absolute times, is what to read).

Variants (``--backends``) try changes to the service *from this wrapper only*, to
measure what a change in consumer/ would buy before making it:

* ``postgres-depthN``: ``PostgresStore.pipeline_depth`` = N (batches in flight; 2 now);
* ``postgres-noreset``: the asyncpg pool without its reset round trip on release
  (``create_pool(reset=...)`` a no-op; the store keeps no session state on pool
  connections: LISTEN has its own connection);
* ``postgres-custom``: the database set to ``plan_cache_mode = force_custom_plan``
  (``ALTER DATABASE``), so the lock-and-read function's statements are planned per call
  against the tables' current size rather than once, generically, while they were empty;
* combined: ``postgres-depth8-noreset``.

``--auto-explain MS`` logs the plans (``EXPLAIN ANALYZE``, nested statements too) of
PostgreSQL statements slower than MS in the server's log and summarises them.

    .venv/bin/python bench/pg_profile.py --rounds 2 --duration 12 [--cprofile]
    .venv/bin/python bench/pg_profile.py --backends postgres,postgres-depth8,postgres-noreset
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the wrapper


def apply_variants() -> None:
    """The PWPROF_* experiments, patched into the service from outside."""
    import asyncpg

    from consumer.store.postgres.store import PostgresStore

    depth = int(os.environ.get("PWPROF_DEPTH", "0"))
    if depth:
        PostgresStore.pipeline_depth = property(lambda self: depth)  # type: ignore[method-assign]
    if os.environ.get("PWPROF_NO_RESET") == "1":
        create_pool = asyncpg.create_pool

        async def no_reset(con: Any) -> None:
            del con

        def pool_without_reset(*args: Any, **kwargs: Any) -> Any:
            return create_pool(*args, reset=no_reset, **kwargs)

        asyncpg.create_pool = pool_without_reset


def serve_wrapped(timings_out: Path, prof_out: Path | None) -> None:
    """``phasewatch serve`` with timers around the PostgreSQL store and asyncpg."""
    import asyncpg

    from consumer.cli.main import main
    from consumer.store.postgres.store import PostgresStore

    stats: dict[str, list[float]] = collections.defaultdict(list)
    batches: list[int] = []

    def timed(name: str, fn: Any) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                stats[name].append(time.perf_counter() - t0)

        return wrapper

    def sql_timed(method: str) -> None:
        fn = getattr(asyncpg.connection.Connection, method)

        async def wrapper(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(self, query, *args, **kwargs)
            finally:
                key = " ".join(query.split()[:4])[:48]
                stats[f"sql {method}: {key}"].append(time.perf_counter() - t0)

        setattr(asyncpg.connection.Connection, method, wrapper)

    for method in ("fetch", "fetchrow", "fetchval", "execute"):
        sql_timed(method)
    apply_variants()
    ingest = PostgresStore.ingest

    async def ingest_wrapper(self: Any, events: Any, *args: Any, **kwargs: Any) -> Any:
        batch = list(events)
        batches.append(len(batch))
        t0 = time.perf_counter()
        try:
            return await ingest(self, batch, *args, **kwargs)
        finally:
            stats["PostgresStore.ingest (one transaction)"].append(time.perf_counter() - t0)

    PostgresStore.ingest = ingest_wrapper  # type: ignore[method-assign]
    PostgresStore.ingest_raw = timed(  # type: ignore[method-assign]
        "PostgresStore.ingest_raw (decode + ingest)", PostgresStore.ingest_raw
    )
    profiler = cProfile.Profile() if prof_out else None

    def dump() -> None:
        if profiler is not None and prof_out is not None:
            profiler.disable()
            profiler.dump_stats(str(prof_out))
        summary = {
            name: {"n": len(v), "total_s": sum(v), "mean_ms": 1000 * statistics.fmean(v)}
            for name, v in stats.items()
            if v
        }
        summary["batch sizes"] = {
            "n": len(batches),
            "mean": statistics.fmean(batches) if batches else 0,
            "max": max(batches, default=0),
        }
        timings_out.write_text(json.dumps(summary, indent=1))

    atexit.register(dump)
    if profiler is not None:
        profiler.enable()
    code = main(["serve"])
    sys.exit(code)


# ---------------------------------------------------------------- CPU accounting


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime+cutime+cstime in seconds) of a live process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants (reaped ones are in cutime)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents[int(entry)], cpu[int(entry)] = st
    total, frontier = cpu.get(root, 0.0), [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid:
                total += cpu.get(child, 0.0)
                frontier.append(child)
    return total


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------- one run


def one_run(
    backend: str,
    wb: Any,
    bench: Any,
    pg: Any,
    *,
    postmaster: int,
    rnd: int,
    cprofile: bool,
    auto_explain_ms: int | None = None,
) -> dict[str, Any]:
    cfg = bench.cfg
    db_url = pg.fresh(f"prof_{rnd}") if backend.startswith("postgres") else None
    env_before = dict(os.environ)
    m = re.search(r"-depth(\d+)", backend)
    if m:
        os.environ["PWPROF_DEPTH"] = m.group(1)
    if backend.endswith("-noreset"):
        os.environ["PWPROF_NO_RESET"] = "1"
    if db_url is not None and "-custom" in backend:
        pg.admin(
            f"ALTER DATABASE {db_url.rpartition('/')[2]} SET plan_cache_mode = force_custom_plan"
        )
    if db_url is not None and auto_explain_ms is not None:
        name = db_url.rpartition("/")[2]
        pg.admin(
            f"ALTER DATABASE {name} SET session_preload_libraries = 'auto_explain'",
            f"ALTER DATABASE {name} SET auto_explain.log_min_duration = {auto_explain_ms}",
            f"ALTER DATABASE {name} SET auto_explain.log_analyze = on",
            f"ALTER DATABASE {name} SET auto_explain.log_buffers = on",
            f"ALTER DATABASE {name} SET auto_explain.log_nested_statements = on",
        )
    tmp = Path(tempfile.mkdtemp(prefix="pwprof-"))
    timings, prof = tmp / "timings.json", tmp / "serve.prof"
    wrapper = [
        sys.executable,
        str(Path(__file__)),
        "--serve",
        "--timings",
        str(timings),
        *(["--prof", str(prof)] if cprofile else []),
    ]
    wcfg = wb.Config(**{**wb.asdict(cfg), "phasewatch_cmd": wrapper, "out_json": cfg.out_json})
    server = wb.Server("phasewatch", wcfg, f"prof{rnd}-{backend}", db_url)
    result = wb.RunResult(server=backend, round=rnd, order=0)
    try:
        server.start()
        assert server.proc is not None
        before = (tree_cpu(server.proc.pid), tree_cpu(postmaster), children_cpu())
        t0 = time.monotonic()
        wb.run_wrks(bench.wrk, wcfg, [f"{server.base}/webhooks/livepeer"], bench.deliveries, result)
        wall = time.monotonic() - t0
        after = (tree_cpu(server.proc.pid), tree_cpu(postmaster), children_cpu())
        wb.judge_wrk(result, wcfg)
        server.stop()
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(env_before)
        if db_url is not None:
            pg.drop(db_url)
    requests = int(result.wrk.get("requests", 0)) or 1
    out: dict[str, Any] = {
        "backend": backend,
        "rps": result.wrk.get("rps"),
        "problems": result.problems,
        "wall_s": wall,
        "cpu_us_per_request": {
            "phasewatch": 1e6 * (after[0] - before[0]) / requests,
            "postgres": 1e6 * (after[1] - before[1]) / requests,
            "wrk": 1e6 * (after[2] - before[2]) / requests,
        },
        "cpu_busy_of_2_cores": sum(a - b for a, b in zip(after, before, strict=True)) / wall,
    }
    with contextlib.suppress(OSError, ValueError):
        out["timings"] = json.loads(timings.read_text())
    if cprofile and prof.exists():
        buf = io.StringIO()
        pstats.Stats(str(prof), stream=buf).sort_stats("tottime").print_stats(25)
        out["cprofile_tottime"] = buf.getvalue()
        buf = io.StringIO()
        pstats.Stats(str(prof), stream=buf).sort_stats("cumulative").print_stats(40)
        out["cprofile_cumulative"] = buf.getvalue()
    return out


def summarise_auto_explain(log: Path) -> None:
    """The slow statements auto_explain logged: count and mean duration per query text,
    and the plan of the slowest of each."""
    text = log.read_text(errors="replace")
    entries = re.split(r"\n(?=\S.*LOG:  duration: )", text)
    by_query: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for entry in entries:
        m = re.search(r"LOG:  duration: ([\d.]+) ms  plan:\n\s*Query Text: (.*)", entry)
        if m:
            key = " ".join(m.group(2).split())[:70]
            by_query[key].append((float(m.group(1)), entry))
    print(f"auto_explain: {sum(len(v) for v in by_query.values())} slow statements logged")
    for key, items in sorted(by_query.items(), key=lambda kv: -sum(d for d, _ in kv[1]))[:6]:
        durations = [d for d, _ in items]
        print(f"  {len(items):>5} x mean {statistics.fmean(durations):6.1f} ms  {key}")
        slowest = max(items)[1]
        print("\n".join("      " + line for line in slowest.splitlines()[:40]))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timings", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prof", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=12)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--cprofile", action="store_true", help="profile the service (PostgreSQL)")
    ap.add_argument("--auto-explain", type=int, metavar="MS", help="log plans slower than MS")
    ap.add_argument("--json", type=Path, default=BENCH / "results" / "pg_profile.json")
    a = ap.parse_args()
    if a.serve:
        serve_wrapped(a.timings, a.prof)
        return
    import webhook_bench as wb
    from pg_local import bench_postgres, code_state

    cfg, _ = wb.parse_args(["--duration", str(a.duration), "--connections", str(a.connections)])
    wrk = wb.ensure_wrk(False)
    deliveries, _meta = wb.ensure_deliveries(cfg)
    bench = wb.Bench(cfg=cfg, wrk=wrk, deliveries=deliveries, index=None)
    backends = a.backends.split(",")
    runs = []
    print(f"code: {code_state()}")
    with bench_postgres(None) as pg:
        pid_file = pg.local.data / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
        for rnd in range(a.rounds):
            for backend in backends if rnd % 2 == 0 else backends[::-1]:
                r = one_run(
                    backend,
                    wb,
                    bench,
                    pg,
                    postmaster=postmaster,
                    rnd=rnd,
                    cprofile=False,
                    auto_explain_ms=a.auto_explain,
                )
                runs.append(r)
                cpu = r["cpu_us_per_request"]
                print(
                    f"round {rnd} {backend:<8} {r['rps'] or 0:8.0f} req/s; CPU us/request:"
                    f" phasewatch {cpu['phasewatch']:.0f}, postgres {cpu['postgres']:.0f},"
                    f" wrk {cpu['wrk']:.0f}; {r['cpu_busy_of_2_cores']:.2f} CPUs busy"
                    f" (ours) {r['problems'] or ''}",
                    flush=True,
                )
                for name, t in sorted((r.get("timings") or {}).items()):
                    if "mean_ms" in t:
                        print(f"    {name:<62} n={t['n']:>6} mean {t['mean_ms']:7.2f} ms")
                    else:
                        print(f"    {name:<62} {t}")
        if a.cprofile and "postgres" in backends:
            r = one_run(
                "postgres", wb, bench, pg, postmaster=postmaster, rnd=a.rounds, cprofile=True
            )
            runs.append(r)
            print(f"cProfile run (postgres): {r['rps'] or 0:.0f} req/s (slowed by the profiler)")
            print(r.get("cprofile_tottime", ""))
            print(r.get("cprofile_cumulative", ""))
        if a.auto_explain is not None:
            summarise_auto_explain(pg.local.log_path)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(runs, indent=1, default=str))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
