"""Garbage collector settings for the processes that ingest in batches.

A batch's objects (a few thousand decoded events, each a tree of dicts) all stay alive
until the batch is planned or committed, and die by reference counting afterwards;
garbage cycles are rare here. With CPython's default thresholds (a young collection
every 700 allocations) the collector traverses those live objects over and over, and the
full collections it then triggers traverse everything long-lived as well (the planner's
cache, the modules): a third or more of the decoding and planning time, measured in the
writer process and in the Kafka consumer.
"""

from __future__ import annotations

import gc

__all__ = ["tune_for_batches"]

_tuned = False


def tune_for_batches() -> None:
    """Move what is alive now (modules, settings) out of the collector's sight, and
    collect young objects every 100,000 allocations instead of 700. Process-wide; once."""
    global _tuned  # noqa: PLW0603 - process-wide by nature
    if _tuned:
        return
    _tuned = True
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
