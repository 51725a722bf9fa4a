"""Argument types the commands share: each turns a bad value into argparse's own error
(usage, one line naming the argument, exit 2)."""

from __future__ import annotations

import argparse

from consumer.core.model import Phase
from consumer.core.times import parse_time

__all__ = ["phase", "positive", "time_ms"]


def time_ms(text: str) -> int:
    """ISO-8601 or Unix ms."""
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def phase(text: str) -> str:
    """One of Livepeer's phases (a typo would otherwise match nothing, silently)."""
    known = [p.value for p in Phase]
    if text not in known:
        raise argparse.ArgumentTypeError(f"not a phase: {text!r} (one of {', '.join(known)})")
    return text
