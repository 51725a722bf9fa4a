"""``on()``: declare what a handler wants and how it is delivered. Pure: no I/O.

A handler module writes::

    @on(phase="completed", type="upload")
    async def publish(change: PhaseChange) -> None: ...

and ``publish`` is then a :class:`consumer.Subscription`, the only thing the dispatcher
understands. Filters accept a string, an enum member (``Phase.COMPLETED``) or an iterable
of them; an empty filter matches everything. Every argument is checked here, when the
module is imported, so a misconfigured handler fails the service start rather than
silently never firing.

The built-in handlers build their subscriptions through :func:`subscription` so they get
the same checks.

Stuck tasks: ``@on(phase="running", stale_for=300)`` receives a ``kind="stale"`` alert,
once, when a task stays ``running`` with no newer snapshot for 300 s after its
``status.updatedAt`` (a newer snapshot in the same phase starts the wait again). Such a
subscription receives only those alerts; :func:`with_stale` adds alerts to one that also
receives phase changes (how the built-ins carry them).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from enum import Enum
from types import EllipsisType
from typing import Any

from consumer import DeliveryPolicy, Handler, Phase, PhaseChange, Subscription, TaskType

__all__ = [
    "PhaseFilter",
    "Predicate",
    "PreviousFilter",
    "TypeFilter",
    "on",
    "phase_set",
    "previous_set",
    "stale_map",
    "subscription",
    "type_set",
    "with_stale",
]

PhaseFilter = str | Iterable[str] | None
"""``"completed"``, ``Phase.COMPLETED``, ``["completed", "failed"]``; None: any."""
PreviousFilter = str | Iterable[str | None] | None | EllipsisType
"""Like :data:`PhaseFilter`, but None means "first sight"; ``...`` (the default): any."""
TypeFilter = str | Iterable[str] | None
"""``"upload"``, ``TaskType.UPLOAD``, or an iterable of them; None: any."""
Predicate = Callable[[PhaseChange], bool]

DEFAULT_POLICY = DeliveryPolicy()
"""The defaults of ``on()`` and the built-ins: spelled once, in DeliveryPolicy."""

_KNOWN_PHASES = frozenset(p.value for p in Phase)
_KNOWN_TYPES = frozenset(t.value for t in TaskType)
# Phases a task never leaves: a stale_for on one of them alerts on every such task.
_FINAL_PHASES = frozenset({Phase.COMPLETED.value, Phase.FAILED.value, Phase.CANCELLED.value})
# Longer than any wait worth alerting on, and far inside what the stores hold in ms.
_MAX_STALE_S = 366 * 86400.0


def phase_set(value: PhaseFilter, *, what: str = "phase") -> frozenset[str]:
    """The phases a filter names (empty: any phase)."""
    return frozenset(_names(value, what, _KNOWN_PHASES, "phase"))


def type_set(value: TypeFilter, *, what: str = "type") -> frozenset[str]:
    """The task types a filter names (empty: any type)."""
    return frozenset(_names(value, what, _KNOWN_TYPES, "task type"))


def previous_set(value: PreviousFilter, *, what: str = "previous") -> frozenset[str | None]:
    """The phases changed from (None: first sight); empty: any."""
    if value is ...:
        return frozenset()
    if value is None:
        return frozenset({None})
    if isinstance(value, str):
        return frozenset({_name(value, what, _KNOWN_PHASES, "phase")})
    if not isinstance(value, Iterable):
        raise TypeError(f"{what}: expected a phase, None or an iterable of them, got {value!r}")
    return frozenset(
        None if item is None else _name(item, what, _KNOWN_PHASES, "phase") for item in value
    )


def stale_seconds(value: object, what: str = "stale_for") -> float:
    """A ``stale_for``: a positive, finite number of seconds (at most a year)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what}: expected a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > _MAX_STALE_S:
        raise ValueError(
            f"{what}: must be a positive number of seconds, at most {_MAX_STALE_S:.0f}"
            f" (a year), got {value!r}"
        )
    if seconds < 0.001:
        raise ValueError(f"{what}: must be at least 0.001 s (one millisecond), got {value!r}")
    return seconds


def stale_map(value: Mapping[str, float] | None, *, what: str = "stale_for") -> dict[str, float]:
    """Phase -> seconds, checked: known phase names (an unknown one warns, as filters
    do; a final phase warns that every task in it alerts) and positive seconds."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what}: expected a mapping of phase to seconds, got {value!r}")
    out: dict[str, float] = {}
    for phase, seconds in value.items():
        name = _name(phase, what, _KNOWN_PHASES, "phase")
        if name in _FINAL_PHASES:
            warnings.warn(
                f"{what}: tasks stay {name!r} for good: every {name} task will be alerted"
                " as stale once",
                UserWarning,
                stacklevel=_outside_this_module(),
            )
        out[name] = stale_seconds(seconds, f"{what}[{name!r}]")
    return out


def _names(
    value: str | Iterable[str] | None, what: str, known: frozenset[str], noun: str
) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {_name(value, what, known, noun)}
    if not isinstance(value, Iterable):
        raise TypeError(f"{what}: expected a {noun}, or an iterable of them, got {value!r}")
    return {_name(item, what, known, noun) for item in value}


def _name(item: object, what: str, known: frozenset[str], noun: str) -> str:
    if not isinstance(item, str):
        raise TypeError(f"{what}: expected a {noun} name (str), got {item!r}")
    # Phase and TaskType are StrEnums: keep the plain value so filters compare as strings.
    name = item.value if isinstance(item, Enum) else str(item)
    if not name.strip():
        raise ValueError(f"{what}: an empty {noun} name never matches")
    if name not in known:
        # Livepeer adds values over time, so an unknown name is allowed; but it is far more
        # often a typo ("complete"), which would otherwise never fire and never say why.
        warnings.warn(
            f"{what}: {name!r} is not a known {noun} ({', '.join(sorted(known))}); "
            "it will only match if Livepeer sends exactly that value",
            UserWarning,
            stacklevel=_outside_this_module(),
        )
    return name


def _outside_this_module() -> int:
    # The warning should point at the user's @on(...) line, however many helper frames
    # (comprehensions included) lie between it and here.
    level = 1
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    # This helper's own frame counted as one level more than warnings.warn's caller.
    return level - 1


def _check_where(where: object) -> None:
    if where is None:
        return
    if not callable(where):
        raise TypeError(f"where must be a callable taking the change, got {where!r}")
    if _is_async(where):
        # The dispatcher calls it synchronously; a coroutine object would always be truthy.
        raise TypeError("where must be a plain (not async) function returning a bool")


def _is_async(fn: object) -> bool:
    # An object with ``async def __call__`` is as good as an async function.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 -- wants an async __call__, not callability
    )


def _default_name(fn: object) -> str:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def subscription(
    fn: Handler,
    *,
    name: str,
    phases: frozenset[str] = frozenset(),
    previous: frozenset[str | None] = frozenset(),
    types: frozenset[str] = frozenset(),
    where: Predicate | None = None,
    updates: bool = False,
    policy: DeliveryPolicy = DEFAULT_POLICY,
    on_start: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    extra: dict[str, Any] | None = None,
    stale_for: Mapping[str, float] | None = None,
    stale_only: bool = False,
) -> Subscription:
    """A checked :class:`consumer.Subscription` (filters already normalized; the policy
    checked itself when it was built). ``stale_for``: phase -> seconds, stale alerts
    wanted (see :func:`on`); ``stale_only``: nothing else."""
    if isinstance(fn, Subscription):
        raise TypeError(f"handler {name!r} is already a subscription: apply @on(...) once")
    if not _is_async(fn):
        raise TypeError(
            f"handler {name!r} must be an async function (async def), got {fn!r}: "
            "the dispatcher awaits it"
        )
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a handler name must be a non-empty string, got {name!r}")
    _check_where(where)
    if not isinstance(updates, bool):
        raise TypeError(f"updates must be True or False, got {updates!r}")
    if not isinstance(policy, DeliveryPolicy):
        raise TypeError(f"policy must be a consumer.DeliveryPolicy, got {policy!r}")
    for label, hook in (("on_start", on_start), ("on_stop", on_stop)):
        if hook is not None and not _is_async(hook):
            raise TypeError(f"{label} must be an async function taking no argument")
    stale = stale_map(stale_for)
    if not isinstance(stale_only, bool):
        raise TypeError(f"stale_only must be True or False, got {stale_only!r}")
    if stale_only and not stale:
        raise ValueError(f"handler {name!r}: stale_only without stale_for would never fire")
    if stale_only and updates:
        raise ValueError(f"handler {name!r}: stale_only receives no updates")
    return Subscription(
        name=name,
        fn=fn,
        phases=phases,
        previous=previous,
        types=types,
        where=where,
        updates=updates,
        policy=policy,
        on_start=on_start,
        on_stop=on_stop,
        extra=dict(extra or {}),
        stale_for=stale,
        stale_only=stale_only,
    )


def with_stale(
    sub: Subscription, stale_for: Mapping[str, float], *, stale_only: bool = False
) -> Subscription:
    """``sub`` that also receives stale alerts for ``stale_for`` (phase -> seconds), e.g.
    a built-in notifier; ``stale_only``: and nothing else. An empty mapping returns
    ``sub`` unchanged (unless ``stale_only``, which is an error then)."""
    if not stale_for and not stale_only:
        return sub
    return subscription(
        sub.fn,
        name=sub.name,
        phases=sub.phases,
        previous=sub.previous,
        types=sub.types,
        where=sub.where,
        updates=sub.updates and not stale_only,
        policy=sub.policy,
        on_start=sub.on_start,
        on_stop=sub.on_stop,
        extra=sub.extra,
        stale_for={**sub.stale_for, **stale_for},
        stale_only=stale_only,
    )


def on(
    phase: PhaseFilter = None,
    *,
    previous: PreviousFilter = ...,
    type: TypeFilter = None,  # the domain word; shadows builtins.type, unused in here
    where: Predicate | None = None,
    updates: bool = False,
    stale_for: float | None = None,
    name: str | None = None,
    concurrency: int = DEFAULT_POLICY.concurrency,
    timeout_s: float = DEFAULT_POLICY.timeout_s,
    max_attempts: int = DEFAULT_POLICY.max_attempts,
    max_age_s: float = DEFAULT_POLICY.max_age_s,
    backoff_s: float = DEFAULT_POLICY.backoff_s,
    max_backoff_s: float = DEFAULT_POLICY.max_backoff_s,
) -> Callable[[Handler], Subscription]:
    """Turn ``async def f(change)`` into a :class:`consumer.Subscription`.

    ``phase``: the phases changed to; ``previous``: the phases changed from (None: first
    sight of the task; default: any); ``type``: task types; ``where``: a predicate on the
    change, checked after the other filters; ``updates``: also receive changes that are
    not phase changes (progress, output...). ``name`` defaults to ``module:qualname`` and
    identifies the handler in delivery records and logs, so keep it stable.

    ``stale_for`` (seconds): instead of phase changes, receive a ``kind="stale"`` alert,
    once, when a task stays in one of ``phase`` with no newer snapshot for that long
    after its ``status.updatedAt``. A newer snapshot cancels the wait (one in the same
    phase starts a new one, which may alert again). Alerts are recorded in the store by
    the service's sweeper, so they survive restarts and fire once across replicas;
    tasks folded by ``import`` or ``replay kafka`` without ``--fire-handlers`` are not
    watched. Needs ``phase``; ``previous`` and ``updates`` do not apply.

    Delivery: at most ``concurrency`` calls at once, each cancelled after ``timeout_s``;
    an exception is retried with exponential backoff from ``backoff_s`` up to
    ``max_backoff_s``, at most ``max_attempts`` times within ``max_age_s``; raise
    :class:`consumer.PermanentError` to give up at once.
    """
    if callable(phase) and not isinstance(phase, str | Iterable):
        raise TypeError(
            "on() takes filters, not the handler: write @on() or @on(phase=...), with parentheses"
        )
    phases = phase_set(phase)
    previous_phases = previous_set(previous)
    types = type_set(type)
    # Checked now (the policy checks itself), at import of the handler module.
    policy = DeliveryPolicy(
        concurrency=concurrency,
        timeout_s=timeout_s,
        max_attempts=max_attempts,
        max_age_s=max_age_s,
        backoff_s=backoff_s,
        max_backoff_s=max_backoff_s,
    )
    _check_where(where)
    if not isinstance(updates, bool):
        raise TypeError(f"updates must be True or False, got {updates!r}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    stale: dict[str, float] = {}
    if stale_for is not None:
        seconds = stale_seconds(stale_for)
        if not phases:
            raise ValueError(
                "stale_for needs phase=...: the phase(s) a task must stay in to be alerted"
            )
        if previous is not ...:
            raise ValueError("previous does not apply to stale alerts (stale_for)")
        if updates:
            raise ValueError("updates does not apply to stale alerts (stale_for)")
        stale = dict.fromkeys(sorted(phases), seconds)

    def decorate(fn: Handler) -> Subscription:
        if isinstance(fn, Subscription):
            raise TypeError(f"{fn.name!r} is already a handler: apply @on(...) once")
        if not _is_async(fn):
            raise TypeError(
                f"@on(...) needs an async function (async def ...), got {fn!r}: "
                "the dispatcher awaits each call"
            )
        return subscription(
            fn,
            name=name or _default_name(fn),
            phases=phases,
            previous=previous_phases,
            types=types,
            where=where,
            updates=updates,
            policy=policy,
            stale_for=stale or None,
            stale_only=bool(stale),
        )

    return decorate
