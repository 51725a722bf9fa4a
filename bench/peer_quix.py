"""Kafka consumption against a peer: phasewatch's events/s next to a Quix Streams app's.

One pre-filled topic of N realistic Livepeer webhook bodies (``ingest_bench.make_bodies``:
copies of the ``messy`` fixture's lifecycles with fresh ids, keyed by task id, 4
partitions), consumed from the start by a fresh consumer group per run, each run its own
process. In the same rounds, alternating the order (reversed every round):

* **quix**: ``bench/quix_app.py``, a Quix Streams ``Application`` with its defaults
  (at-least-once, commit_interval 5 s, RocksDB state plus its changelog topic), run in its
  own virtualenv (``bench/results/quix-venv``, made here once: ``pip install
  quixstreams==3.28.*``). It parses each value with Quix's ``"json"`` deserializer
  (orjson), folds it into the task held in its ``State`` with the per-field newest-wins
  rule of spec §5 as phasewatch applies it, counts phase changes, and stops itself at
  the N-th record;
* **phasewatch**: ``kafka_bench.run_phasewatch``, phasewatch's ``KafkaSource`` with default
  settings into a fresh SQLite store (writer process, ``synchronous=FULL``: decode, dedup,
  fold, history and phase changes in one transaction per batch, offsets committed after);
  run here as a child that reads the store's phase-change count before the store goes;
* **bare**: ``kafka_bench``'s bare aiokafka loop (``getmany`` + ``orjson.loads``), the
  floor of what any Python consumer can do here.

Each is timed as kafka_bench times phasewatch: from the first record processed (for
phasewatch, the first batch stored) to the N-th; that first record or batch not counted.
Medians over rounds; the ratios are medians of per-round ratios. Sanity: both must end
with the same number of tasks, and their phase-change counts (first sight included, as
phasewatch records them) must agree.
Each run also reports its CPU seconds and the "other load": the cores that processes
other than the run and the broker started here kept busy meanwhile (from /proc), since
the machine may be shared; the report notes any run above 0.25 cores.

    .venv/bin/python bench/peer_quix.py [--events 225000] [--rounds 3]
        [--bootstrap HOST:PORT]   # default: start deploy/kafka_local.py on free ports
        [--topic NAME]            # an already filled topic (default: fill a fresh one)
        [--only quix,phasewatch,bare] [--json bench/results/peer_quix.json]

Exit status 1 if a run was invalid (fewer than N records, a crash, a timeout) or the two
sides disagree on tasks or phase changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import kafka_bench  # noqa: E402

QUIX_VENV = BENCH / "results" / "quix-venv"
QUIX_APP = BENCH / "quix_app.py"
QUIX_WANTED = "quixstreams==3.28.*"
# If 3.28 does not install (a Python it has no wheels for, say): the nearest 3.x below it,
# then any 3.x.
QUIX_FALLBACKS = ("quixstreams>=3,<3.28", "quixstreams>=3,<4")
KINDS = ("quix", "phasewatch", "bare")
LABELS = {
    "quix": "Quix Streams app (State fold, RocksDB + changelog)",
    "phasewatch": "phasewatch KafkaSource -> SQLite (process)",
    "bare": "bare aiokafka loop (getmany + orjson.loads)",
}


def quix_python() -> tuple[Path, str, str]:
    """The Quix virtualenv's interpreter, made on first use; with the Quix Streams
    version installed and how it was chosen."""
    python = QUIX_VENV / "bin" / "python"
    note_path = QUIX_VENV / "phasewatch-bench-spec"

    def installed() -> str | None:
        if not python.exists():
            return None
        out = subprocess.run(
            [str(python), "-c", "import quixstreams; print(quixstreams.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() if out.returncode == 0 else None

    version = installed()
    if version is not None and note_path.exists():
        return python, version, note_path.read_text().strip()
    shutil.rmtree(QUIX_VENV, ignore_errors=True)
    base = shutil.which("python3") or sys.executable
    print(f"making {QUIX_VENV} ({base} -m venv)", file=sys.stderr)
    subprocess.run([base, "-m", "venv", str(QUIX_VENV)], check=True)
    for spec in (QUIX_WANTED, *QUIX_FALLBACKS):
        print(f"pip install {spec}", file=sys.stderr)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", spec],
            check=False,
        )
        if done.returncode == 0:
            break
    else:
        raise SystemExit("could not install any Quix Streams 3.x into the bench venv")
    version = installed()
    if version is None:
        raise SystemExit("Quix Streams installed but does not import in the bench venv")
    how = spec if spec == QUIX_WANTED else f"{spec} ({QUIX_WANTED} did not install)"
    note_path.write_text(how + "\n")
    return python, version, how


def run_phasewatch_child(bootstrap: str, topic: str, n: int) -> dict[str, Any]:
    """kafka_bench's phasewatch run, and the phase changes its store recorded."""
    from consumer.store.sqlite.store import SQLiteStore

    async def changes(db: Path) -> int:
        store = SQLiteStore(db)
        await store.open()
        try:
            return (await store.stats()).changes
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        result = asyncio.run(kafka_bench.run_phasewatch(bootstrap, topic, n, db))
        result["changes"] = asyncio.run(changes(db))
    return result


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: all but idle and iowait.
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int | None) -> float:
    """utime + stime of one live process (the broker started here), 0 if none."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_one(
    kind: str,
    bootstrap: str,
    topic: str,
    n: int,
    *,
    timeout: float,
    quix: Path,
    broker_pid: int | None,
) -> Any:
    """One run in its own process: its JSON result, or a string saying why it is invalid.

    The result gains the run's CPU seconds (its process and those it waited for, such as
    phasewatch's writer) and ``other_load``: the cores that everything else (but the
    broker started here) kept busy meanwhile, averaged over the run's whole process. The
    machine may be shared: a run with much other load is worth running again."""
    busy, own, broker = _busy_seconds(), _children_cpu(), _cpu_seconds(broker_pid)
    started = time.perf_counter()
    if kind == "quix":
        cmd = [str(quix), str(QUIX_APP), "--bootstrap", bootstrap, "--topic", topic]
        cmd += ["--events", str(n)]
    elif kind == "phasewatch":
        cmd = [sys.executable, __file__, "--child", "phasewatch", "--bootstrap", bootstrap]
        cmd += ["--topic", topic, "--events", str(n)]
    else:
        cmd = kafka_bench._child_cmd("bare", bootstrap, topic, n)
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, check=True)
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f}s"
    except (subprocess.CalledProcessError, ValueError, IndexError) as exc:
        return f"failed: {exc}"
    wall = time.perf_counter() - started
    result["run_cpu_seconds"] = _children_cpu() - own
    others = _busy_seconds() - busy - result["run_cpu_seconds"]
    others -= _cpu_seconds(broker_pid) - broker
    result["other_load"] = max(0.0, others) / wall
    result["run_wall_seconds"] = wall
    records = result.get("records", n)  # the bare loop stops at N or never
    if records < n or not result["rate"]:
        return f"processed {records} of {n} records: {result}"
    return result


def summary(kind: str, result: dict[str, Any]) -> str:
    line = f"{result['rate']:>9,.0f} events/s  {result['seconds']:6.2f}s"
    line += f"  peak RSS {result['peak_rss_mb']:4.0f} MB"
    line += f"  CPU {result['run_cpu_seconds']:5.1f}s  other load {result['other_load']:.2f}"
    if kind != "bare":
        line += f"  tasks {result['tasks']}  phase changes {result['changes']}"
    if kind == "quix":
        line += f"  (to app.run() returning: {result['seconds_to_return']:.2f}s)"
    if kind == "phasewatch":
        line += f"  events stored {result['events_stored']}"
    return line


def ratios(
    runs: dict[str, list[dict[str, Any] | None]], top: str, bottom: str
) -> list[float] | None:
    if top not in runs or bottom not in runs:
        return None
    return [
        a["rate"] / b["rate"]
        for a, b in zip(runs[top], runs[bottom], strict=True)
        if a is not None and b is not None
    ]


def report(args: argparse.Namespace, kinds: list[str], runs: dict[str, Any]) -> dict[str, Any]:
    """Medians, ratios and the sanity check, printed and returned for the JSON report."""
    print(f"{args.events} events, {args.partitions} partitions, {args.rounds} round(s), medians")
    medians: dict[str, float] = {}
    for kind in kinds:
        good = [r for r in runs[kind] if r is not None]
        if not good:
            print(f"  {LABELS[kind]:<52} no valid run")
            continue
        rates = [r["rate"] for r in good]
        medians[kind] = statistics.median(rates)
        print(
            f"  {LABELS[kind]:<52} {medians[kind]:>9,.0f} events/s"
            f"  peak RSS {statistics.median(r['peak_rss_mb'] for r in good):.0f} MB"
            f"  rounds {', '.join(f'{x:,.0f}' for x in rates)}"
            f"  other load up to {max(r['other_load'] for r in good):.2f}"
        )
    ratio_report: dict[str, Any] = {}
    for top, bottom in (("phasewatch", "quix"), ("phasewatch", "bare"), ("quix", "bare")):
        per_round = ratios(runs, top, bottom)
        if per_round:
            ratio_report[f"{top}/{bottom}"] = {
                "median": statistics.median(per_round),
                "rounds": per_round,
            }
            print(
                f"  ratio {top}/{bottom}: {statistics.median(per_round):.2f}"
                f" ({', '.join(f'{x:.2f}' for x in per_round)})"
            )
    sanity: dict[str, Any] = {"ok": True}
    for field in ("tasks", "changes"):
        seen = {
            kind: sorted({r[field] for r in runs[kind] if r is not None})
            for kind in ("quix", "phasewatch")
            if kind in runs
        }
        sanity[field] = seen
        values = [v for vs in seen.values() for v in vs]
        if not values:
            continue
        spread = (max(values) - min(values)) / max(values)
        # Tasks must match exactly; phase changes within 1% (they match exactly when the
        # two folds agree, which is what bench/quix_app.py's fold is written for).
        if spread > (0 if field == "tasks" else 0.01):
            sanity["ok"] = False
        print(f"  {field}: {', '.join(f'{k} {v}' for k, v in seen.items())}")
    if not sanity["ok"]:
        print("  SANITY CHECK FAILED: the two sides disagree (see above)")
    loads = [r["other_load"] for kind in kinds for r in runs[kind] if r is not None]
    if loads and max(loads) > 0.25:
        print(
            f"  NOTE: other processes kept up to {max(loads):.2f} cores busy during a run"
            f" (of {os.cpu_count()}): these figures are noisy, run again on a quieter machine"
        )
    return {"medians": medians, "ratios": ratio_report, "sanity": sanity}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=225_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bootstrap", help="a running broker (default: start a local one)")
    parser.add_argument("--topic", help="an already filled topic of --events records")
    parser.add_argument("--partitions", type=int, default=4, help="of the topic filled here")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KIND[,KIND]",
        help="run only these of quix, phasewatch, bare (repeatable or a comma list)",
    )
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "peer_quix.json")
    parser.add_argument(
        "--timeout", type=float, default=0, help="seconds per run (default 300 + N/1000)"
    )
    parser.add_argument("--child", choices=["phasewatch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    only = [k.strip() for value in args.only for k in value.split(",") if k.strip()]
    unknown = sorted(set(only) - set(KINDS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(KINDS)})")
    args.kinds = [k for k in KINDS if k in only] if only else list(KINDS)
    if args.child and not (args.bootstrap and args.topic):
        parser.error("--child needs --bootstrap and --topic")
    return args


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(run_phasewatch_child(args.bootstrap, args.topic, args.events)))
        return 0

    from pg_local import code_state

    quix, quix_version, quix_how = (
        quix_python() if "quix" in args.kinds else (Path(), "not used", "")
    )
    if "quix" in args.kinds:
        print(f"quixstreams {quix_version} (installed as {quix_how})", file=sys.stderr)
    code = code_state()
    print(f"code: {code}", file=sys.stderr)
    timeout = args.timeout or 300 + args.events / 1000
    kinds: list[str] = args.kinds
    runs: dict[str, list[dict[str, Any] | None]] = {k: [] for k in kinds}
    invalid: list[str] = []
    with contextlib.ExitStack() as stack:
        bootstrap = args.bootstrap
        broker_pid = None
        if not bootstrap:
            broker = kafka_bench.load_kafka_local().LocalKafka()
            bootstrap = broker.start()
            broker_pid = broker.pid
            stack.callback(broker.close)
        topic = args.topic or f"peer-quix-{uuid.uuid4().hex[:8]}"
        if not args.topic:
            asyncio.run(kafka_bench.fill(bootstrap, topic, args.events, args.partitions))
        for round_no in range(args.rounds):
            order = kinds if round_no % 2 == 0 else kinds[::-1]
            for kind in order:
                result = run_one(
                    kind,
                    bootstrap,
                    topic,
                    args.events,
                    timeout=timeout,
                    quix=quix,
                    broker_pid=broker_pid,
                )
                if isinstance(result, str):
                    invalid.append(f"round {round_no + 1} {kind}: {result}")
                    print(f"round {round_no + 1} {kind:<10} INVALID: {result}", flush=True)
                    runs[kind].append(None)
                    continue
                runs[kind].append(result)
                print(f"round {round_no + 1} {kind:<10} {summary(kind, result)}", flush=True)
    figures = report(args, kinds, runs)
    doc = {
        "events": args.events,
        "rounds": args.rounds,
        "partitions": args.partitions if not args.topic else None,
        "topic": topic,
        "kinds": kinds,
        "quixstreams": quix_version,
        "quixstreams_installed_as": quix_how,
        "code": code,
        "cpus": os.cpu_count(),
        "runs": runs,
        "invalid": invalid,
        **figures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"report: {args.json}", file=sys.stderr)
    return 1 if invalid or not figures["sanity"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
