"""Webhook throughput while a handler blocks its thread 2 s per change, against the
same service with no handler, in one run (issue: isolate handlers from ingestion).

Alternating rounds of ``webhook_bench.py --only phasewatch`` (wrk, signed deliveries,
SQLite FULL), one with ``PHASEWATCH_HANDLERS=blocking_handler:block`` and one without.
Goal: the blocked service keeps at least 0.8 of the throughput, with p99 under 500 ms.

    .venv/bin/python bench/blocking_handler_bench.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PY = sys.executable


def one(with_handler: bool, duration: int, out: Path) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")])
    if with_handler:
        env["PHASEWATCH_HANDLERS"] = "blocking_handler:block"
    else:
        env.pop("PHASEWATCH_HANDLERS", None)
    subprocess.run(
        [
            PY,
            str(BENCH / "webhook_bench.py"),
            "--only",
            "phasewatch",
            "--rounds",
            "1",
            "--duration",
            str(duration),
            "--json",
            str(out),
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    summary = json.loads(out.read_text())["summary"]["phasewatch"]
    return {"rps": summary["median_rps"], "p99_ms": summary["median_p99_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=15)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"none": [], "blocking": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = ["none", "blocking"] if rnd % 2 == 0 else ["blocking", "none"]
            for kind in order:
                result = one(kind == "blocking", args.duration, Path(tmp) / f"{kind}{rnd}.json")
                runs[kind].append(result)
                print(
                    f"round {rnd + 1} {kind}: {result['rps']:.0f} req/s, "
                    f"p99 {result['p99_ms']:.1f} ms",
                    flush=True,
                )
    ratios = [b["rps"] / n["rps"] for b, n in zip(runs["blocking"], runs["none"], strict=True)]
    none_rps = statistics.median(r["rps"] for r in runs["none"])
    blocking_rps = statistics.median(r["rps"] for r in runs["blocking"])
    p99 = statistics.median(r["p99_ms"] for r in runs["blocking"])
    print(
        f"no handler {none_rps:.0f} req/s; blocking handler {blocking_rps:.0f} req/s, "
        f"p99 {p99:.1f} ms; ratio median {statistics.median(ratios):.3f} "
        f"(rounds {', '.join(f'{r:.3f}' for r in ratios)}); goal >= 0.8 and p99 < 500 ms"
    )


if __name__ == "__main__":
    main()
