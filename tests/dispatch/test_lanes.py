"""The pure part of dispatch lanes (consumer.dispatch.lanes): the lane of a task, the
rendezvous assignment of lanes to members, and what a process decides from one read of
the leases."""

from __future__ import annotations

import zlib
from collections import Counter

from consumer.dispatch.lanes import (
    LeaseView,
    cursor_name,
    effective_layout,
    lane_lease,
    lane_of,
    layout_of,
    member_lease,
    owner_id,
    plan,
    preferred,
)


def owner(name: str, lanes: int = 16) -> str:
    return owner_id(name, 100, "n0nce", lanes)


A, B, C = owner("a"), owner("b"), owner("c")


def view(
    members: set[str], holders: dict[int, str] | None = None, legacy: str | None = None
) -> LeaseView:
    return LeaseView(frozenset(members), holders or {}, legacy)


def test_lane_of_is_stable_and_not_pythons_hash() -> None:
    # Pinned values: the same in every process, version and PYTHONHASHSEED.
    assert zlib.crc32(b"abc") == 0x352441C2
    assert lane_of("abc", 16) == 0x352441C2 % 16 == 2
    assert lane_of("abc", 1) == 0
    ids = [f"task-{i}" for i in range(4000)]
    counts = Counter(lane_of(t, 16) for t in ids)
    assert set(counts) == set(range(16))
    assert max(counts.values()) < 2 * min(counts.values())  # spread, roughly even
    assert lane_of("\ud800 lone surrogate", 7) in range(7)  # any str id has a lane


def test_names() -> None:
    assert lane_lease(3) == "dispatch:lane:3"
    assert member_lease(A) == f"dispatch:member:{A}"
    assert cursor_name("notify", 3, 16) == "notify@3/16"
    assert A == "a:100:n0nce:lanes=16"
    assert layout_of(A) == 16
    assert layout_of(owner("x", 3)) == 3
    assert layout_of("host:123:abcdef12") is None  # a pre-lanes dispatcher's owner id


def test_rendezvous_spreads_lanes_and_agrees_everywhere() -> None:
    pref = preferred(64, [A, B, C])
    assert pref == preferred(64, [C, A, B, A])  # order and repeats do not matter
    counts = Counter(pref)
    assert set(counts) == {A, B, C}
    assert min(counts.values()) >= 10  # no member starved (64 / 3 = 21 on average)
    assert preferred(4, []) == [None] * 4
    assert preferred(4, [A]) == [A] * 4


def test_rendezvous_moves_only_the_lanes_of_who_joins_or_leaves() -> None:
    members = [owner(f"m{i}") for i in range(4)]
    before = preferred(256, members)
    newcomer = owner("new")
    after = preferred(256, [*members, newcomer])
    moved = [i for i in range(256) if before[i] != after[i]]
    assert all(after[i] == newcomer for i in moved)  # lanes move only to the newcomer
    assert 256 // 5 // 2 < len(moved) < 256 // 5 * 2  # about 1/n of them
    gone = members[1]
    without = preferred(256, [m for m in members if m != gone])
    changed = [i for i in range(256) if before[i] != without[i]]
    assert changed == [i for i in range(256) if before[i] == gone]  # only its lanes


def test_effective_layout() -> None:
    eight = owner("e", 8)
    assert effective_layout([A, B], None) == 16
    assert effective_layout([A, eight], 8) == 8  # layouts differ: the desired one
    assert effective_layout([A, eight], 16) == 16
    assert effective_layout([A, eight], 4) == 8  # nobody has the desired one: smallest
    assert effective_layout([], 16) is None


def test_lease_view_of_a_read() -> None:
    dead = owner("dead")
    leases = {
        member_lease(A): A,
        member_lease(dead): dead,
        lane_lease(0): A,
        lane_lease(5): dead,
        "dispatch": "old:1:abc",
        "dispatcher-other": A,  # shares the prefix, is none of ours
    }
    got = LeaseView.of(leases, gone=lambda o: o == dead)
    assert got.members == {A}
    assert dict(got.holders) == {0: A}
    assert got.legacy == "old:1:abc"


def test_a_sole_member_takes_every_lane() -> None:
    p = plan(A, 16, view(set()), held=set())
    assert (p.take, p.give_back, p.lost, p.clear) == (
        frozenset(range(16)),
        frozenset(),
        frozenset(),
        True,
    )


def test_members_split_the_lanes_and_give_back_what_another_prefers() -> None:
    pref = preferred(16, [A, B])
    mine_a = {i for i, m in enumerate(pref) if m == A}
    mine_b = set(range(16)) - mine_a
    assert mine_a and mine_b
    # A held everything alone; B joined: A gives B's lanes back, takes nothing.
    everything = dict.fromkeys(range(16), A)
    p = plan(A, 16, view({A, B}, everything), held=set(range(16)))
    assert (p.give_back, p.take, p.mine) == (frozenset(mine_b), frozenset(), frozenset(mine_a))
    # B takes its lanes once they are free, and not A's.
    p = plan(B, 16, view({A, B}, dict.fromkeys(mine_a, A)), held=set())
    assert p.take == mine_b
    # A free lane another member prefers: taken only once it stayed free a while.
    p = plan(B, 16, view({A, B}), held=mine_b, long_free={min(mine_a)})
    assert p.take == {min(mine_a)} and not p.give_back


def test_a_lane_held_by_another_is_lost() -> None:
    p = plan(A, 16, view({A}, {0: A, 1: B}), held={0, 1})
    assert p.lost == {1}
    assert 1 not in p.give_back and 1 not in p.take


def test_another_lane_count_or_a_pre_lanes_dispatcher_is_foreign() -> None:
    eight = owner("e", 8)
    # A (16 lanes) meets a member with 8, and 8 is what the store says is wanted:
    # A gives back everything and takes nothing.
    p = plan(A, 16, view({eight}, {0: A, 1: eight}), held={0}, desired=8)
    assert (p.take, p.give_back, p.clear) == (frozenset(), frozenset({0}), False)
    # The 8-lane member takes lanes but delivers none while A still holds one.
    p = plan(eight, 8, view({A}, {0: A, 1: eight}), held={1}, desired=8)
    assert p.take and not p.clear
    p = plan(eight, 8, view({A}, {1: eight}), held={1}, desired=8)
    assert p.clear
    # The single lease of a version before lanes, held by a process that is no member.
    assert not plan(A, 16, view(set(), legacy="old:1:abc"), held=set()).clear
    assert plan(A, 16, view({B}, {0: B}, legacy=B), held=set()).clear
