"""Handlers: the API users write phase-change reactions against, and built-ins.

A handler is an async callable taking a :class:`consumer.PhaseChange`. Point
``PHASEWATCH_HANDLERS`` at ``module:attribute`` references to load them.
This package imports only ``consumer``'s public API.
"""

from consumer import Handler, PhaseChange

__all__ = ["Handler", "PhaseChange"]
