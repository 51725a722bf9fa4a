"""Dispatch lanes, the pure part: which lane a task is in, what the leases and cursors
of lanes are called, and which process should hold which lane. No I/O; the
:class:`~consumer.dispatch.dispatcher.Dispatcher` does the store's side.

The outbox is split into ``lanes`` lanes by a stable hash of the task id
(:func:`lane_of`: CRC-32, the same in every process and every version, unlike Python's
``hash()``). Each lane has a lease (:func:`lane_lease`) and one holder at a time, so a
task's changes are delivered by one process at a time, in order.

Every dispatching process keeps a member lease (:func:`member_lease`). From the live
members, :func:`preferred` gives each lane its preferred member by rendezvous
(highest-random-weight) hashing: every process computes the same answer from the same
members, lanes spread evenly, and a member joining or leaving moves only the lanes it
gains or had (about ``1/n`` of them). :func:`plan` turns one read of the leases into
what a process does next: take, give back, and whether it may deliver.

A process's owner id (:func:`owner_id`) carries its lane count, so processes configured
with different lane counts (a rolling change of ``PHASEWATCH_DISPATCH_LANES``, whose
lanes overlap) recognise each other's lanes as *foreign*: then only the processes of one
layout (:func:`effective_layout`) keep lanes, and none starts delivering a lane while a
foreign one is held.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass

__all__ = [
    "LANE_PREFIX",
    "LEASE_PREFIX",
    "LEGACY_LEASE",
    "MEMBER_PREFIX",
    "LeaseView",
    "Plan",
    "cursor_name",
    "effective_layout",
    "lane_lease",
    "lane_of",
    "layout_of",
    "member_lease",
    "owner_id",
    "plan",
    "preferred",
    "weight",
]

# Every dispatch lease starts with this: one ``lease_holders`` read sees them all.
LEASE_PREFIX = "dispatch"
# The single lease of versions before lanes: one dispatcher per store. Whoever holds
# lane 0 holds it too, so that such a version, started next to lanes, stands by.
LEGACY_LEASE = "dispatch"
LANE_PREFIX = "dispatch:lane:"
MEMBER_PREFIX = "dispatch:member:"
_LAYOUT_MARK = ":lanes="


def lane_of(task_id: str, lanes: int) -> int:
    """The lane of a task: stable across processes, restarts and versions."""
    return zlib.crc32(task_id.encode("utf-8", "surrogatepass")) % lanes


def lane_lease(lane: int) -> str:
    return f"{LANE_PREFIX}{lane}"


def member_lease(owner: str) -> str:
    return f"{MEMBER_PREFIX}{owner}"


def cursor_name(handler: str, lane: int, lanes: int) -> str:
    """The store cursor of one handler in one lane of a layout of ``lanes`` lanes."""
    return f"{handler}@{lane}/{lanes}"


def owner_id(host: str, pid: int, nonce: str, lanes: int) -> str:
    """``host:pid:nonce:lanes=N``: who holds a lease, and with how many lanes it counts."""
    return f"{host}:{pid}:{nonce}{_LAYOUT_MARK}{lanes}"


def layout_of(owner: str) -> int | None:
    """The lane count an owner id carries (None: not one of a lane dispatcher's)."""
    _, mark, count = owner.rpartition(_LAYOUT_MARK)
    return int(count) if mark and count.isdigit() else None


def weight(member: str, lane: int) -> int:
    """The rendezvous weight of ``member`` for ``lane``: 64 bits of BLAKE2b."""
    digest = hashlib.blake2b(f"{lane}\x00{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preferred(lanes: int, members: Iterable[str]) -> list[str | None]:
    """Each lane's preferred member: the one of highest weight (ties: the larger id).
    None for every lane when there are no members."""
    pool = sorted(set(members))
    if not pool:
        return [None] * lanes

    def best(lane: int) -> str:
        return max(pool, key=lambda m: (weight(m, lane), m))

    return [best(i) for i in range(lanes)]


def effective_layout(members: Iterable[str], desired: int | None) -> int | None:
    """The lane count that dispatches, among the layouts the live members have: the one
    all have; when they differ, ``desired`` (the last started process's, kept in the
    store) if a member has it, else the smallest. None without members."""
    layouts = {n for n in map(layout_of, members) if n is not None}
    if not layouts:
        return None
    if len(layouts) == 1:
        return next(iter(layouts))
    return desired if desired in layouts else min(layouts)


@dataclass(frozen=True, slots=True)
class LeaseView:
    """One read of the dispatch leases (``lease_holders(LEASE_PREFIX, now)``)."""

    members: frozenset[str]  # live members' owner ids
    holders: Mapping[int, str]  # lane -> holder, live lane leases only
    legacy: str | None = None  # holder of the pre-lanes lease, when live

    @classmethod
    def of(cls, leases: Mapping[str, str], *, gone: Callable[[str], bool]) -> LeaseView:
        """From ``name -> holder``. Leases of owners ``gone`` says are dead (a crashed
        process of this host) count as free."""
        members: set[str] = set()
        holders: dict[int, str] = {}
        legacy: str | None = None
        for name, holder in leases.items():
            if gone(holder):
                continue
            if name.startswith(MEMBER_PREFIX):
                members.add(holder)
            elif name.startswith(LANE_PREFIX):
                index = name[len(LANE_PREFIX) :]
                if index.isdigit():
                    holders[int(index)] = holder
            elif name == LEGACY_LEASE:
                legacy = holder
        return cls(frozenset(members), holders, legacy)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one process does after a read of the leases."""

    take: frozenset[int]  # free lanes to acquire
    give_back: frozenset[int]  # held lanes to hand over (after their deliveries end)
    lost: frozenset[int]  # held lanes the read shows someone else holding, or nobody
    clear: bool  # no foreign lane or legacy holder: lanes held may start delivering
    mine: frozenset[int]  # the lanes this process is preferred for


def plan(
    me: str,
    lanes: int,
    view: LeaseView,
    *,
    held: Set[int],
    desired: int | None = None,
    long_free: Set[int] = frozenset(),
) -> Plan:
    """Decide from ``view`` (read after this process's last lease writes).

    * The lanes this process is preferred for (rendezvous among the live members of the
      effective layout, itself included) are taken when free.
    * A free lane preferred by another member is taken too once it has been free for a
      while (``long_free``): coverage, should that member not take it.
    * A held lane preferred by another live member is given back; all held lanes are
      when this process's layout is not the effective one.
    * ``clear`` is False while a lane is held by an owner of another lane count, or the
      pre-lanes lease by a process that is no member: their lanes overlap ours.
    """
    members = view.members | {me}
    lost = frozenset(i for i in held if view.holders.get(i) != me)
    if effective_layout(members, desired) != lanes:
        return Plan(frozenset(), frozenset(held) - lost, lost, clear=False, mine=frozenset())
    pref = preferred(lanes, (m for m in members if layout_of(m) == lanes))
    mine = frozenset(i for i, m in enumerate(pref) if m == me)
    foreign = (view.legacy is not None and view.legacy not in members) or any(
        layout_of(holder) != lanes for holder in view.holders.values()
    )
    take = frozenset(
        i
        for i in range(lanes)
        if i not in held and i not in view.holders and (i in mine or i in long_free)
    )
    give_back = frozenset(held) - mine - lost
    return Plan(take, give_back, lost, clear=not foreign, mine=mine)
