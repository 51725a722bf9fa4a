"""The Quix Streams side of ``peer_quix.py``: the latest task per id, as a Quix application.

Runs in its own virtualenv (``bench/results/quix-venv``, made by ``peer_quix.py``), never
in phasewatch's: only the standard library and Quix Streams (with its own dependencies)
are imported. One process, one ``quixstreams.Application`` with Quix's defaults
(at-least-once, ``commit_interval`` 5 s, RocksDB state with its changelog topic), a fresh
consumer group, ``auto_offset_reset="earliest"``:

* values are parsed by Quix's ``"json"`` deserializer (orjson inside Quix), keys are left
  as bytes (the task id), so the state is scoped per task;
* a stateful ``update`` folds each webhook body into the task held in ``State`` with the
  rule of spec §5 as phasewatch applies it (:func:`fold`), and counts phase changes;
* at the N-th record it calls ``app.stop()``; the rate is timed from the first record
  processed to the N-th, as ``kafka_bench.run_phasewatch`` times phasewatch (from its
  first stored batch to the N-th record stored; the first batch or record not counted).

Prints one JSON line on stdout (rate, seconds, records, tasks, phase changes, peak RSS,
and the time until ``app.run()`` returned, which adds the final checkpoint and shutdown)::

    bench/results/quix-venv/bin/python bench/quix_app.py --bootstrap 127.0.0.1:9092 \\
        --topic bench-1234 --events 225000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from typing import Any

__all__ = ["fold"]


def fold(
    held: dict[str, Any] | None, body: dict[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """Fold one webhook body into ``held`` (``{"task": ..., "keys": ...}`` or None, in
    place); returns the new state (None if the body changed nothing) and the phase before.

    The rule of spec §5, as ``consumer/core/fold.py`` applies it: a snapshot's order key is
    ``(status.updatedAt, event createdAt, event id)``; each top-level field of the snapshot
    replaces the held one unless the held one came from a snapshot ordered at or after it
    (so a duplicate or a resend, same key, takes nothing). A snapshot without ``id`` gets
    the envelope's, as phasewatch's codec does. Keys are lists, not tuples: that is what
    they come back as from the JSON the state is stored in, and lists compare the same."""
    task = body["payload"]["task"]
    snapshot: dict[str, Any] = task["snapshot"]
    if "id" not in snapshot:
        snapshot = {"id": task["id"], **snapshot}
    key = [
        snapshot["status"]["updatedAt"],
        body.get("createdAt", body.get("timestamp", 0)),
        body["id"],
    ]
    if held is None:
        return {"task": snapshot, "keys": dict.fromkeys(snapshot, key)}, None
    current: dict[str, Any] = held["task"]
    keys: dict[str, list[Any]] = held["keys"]
    previous: str = current["status"]["phase"]
    took = False
    for field, value in snapshot.items():
        mine = keys.get(field)
        if mine is not None and mine >= key:
            continue
        took = True
        current[field] = value
        keys[field] = key
    return (held if took else None), previous


def _peak_rss_mb() -> float:
    # VmHWM of this process (ru_maxrss survives exec, so it would report the parent's).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(bootstrap: str, topic_name: str, n: int, group: str, idle_timeout: float) -> dict[str, Any]:
    import quixstreams  # type: ignore[import-not-found]
    from quixstreams import Application

    counts = {"records": 0, "tasks": 0, "changes": 0}
    marks = {"first": 0.0, "last": 0.0}

    with tempfile.TemporaryDirectory(prefix="quix-state-") as state_dir:
        # Defaults throughout, but for where RocksDB keeps its files (Quix's default is
        # ./state) and the quieter log level.
        app = Application(
            broker_address=bootstrap,
            consumer_group=group,
            auto_offset_reset="earliest",
            state_dir=state_dir,
            loglevel="WARNING",
        )
        topic = app.topic(topic_name, value_deserializer="json")
        sdf = app.dataframe(topic)

        def on_record(value: dict[str, Any], state: Any) -> None:
            event = value.get("event")
            if isinstance(event, str) and event.startswith("task."):
                held = state.get("task")
                after, previous = fold(held, value)
                if held is None:
                    counts["tasks"] += 1
                if after is not None:
                    # A phase change, as phasewatch records them: first sight included.
                    if previous != after["task"]["status"]["phase"]:
                        counts["changes"] += 1
                    state.set("task", after)
            counts["records"] += 1
            if counts["records"] == 1:
                marks["first"] = time.perf_counter()
            elif counts["records"] >= n:
                marks["last"] = time.perf_counter()
                app.stop()

        sdf.update(on_record, stateful=True)
        # timeout: stop when no record came for that long (the topic holds fewer than N).
        app.run(timeout=idle_timeout)
        returned = time.perf_counter()

    first, last = marks["first"], marks["last"]
    elapsed = last - first if last else 0.0
    return {
        "rate": (counts["records"] - 1) / elapsed if elapsed else 0.0,
        "seconds": elapsed,
        "records": counts["records"],
        "tasks": counts["tasks"],
        "changes": counts["changes"],
        "seconds_to_return": returned - first if first else 0.0,
        "peak_rss_mb": _peak_rss_mb(),
        "quixstreams": quixstreams.__version__,
        "group": group,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--group", default=None, help="consumer group (default: a fresh one)")
    parser.add_argument(
        "--idle-timeout", type=float, default=60.0, help="stop after this long with no record"
    )
    args = parser.parse_args()
    result = run(
        args.bootstrap,
        args.topic,
        args.events,
        args.group or f"quix-{uuid.uuid4().hex[:8]}",
        args.idle_timeout,
    )
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
