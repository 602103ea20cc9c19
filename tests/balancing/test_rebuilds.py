"""Per-list structures (prefix sums, in-flight groups, ring, the ejector's view) are built once
per instance list and follow every change of it at once; the strategies' properties hold."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loom_ha.balancing import (
    Balancer,
    ConsistentHash,
    Ejector,
    HashRing,
    LeastOutstanding,
    PowerOfTwoEWMA,
    Random,
    RoundRobin,
    WeightedRandom,
)
from loom_ha.event import CloudEvent

from ._support import FakeClock, Node, binomial_bound, chi_square, nodes

SEED = 20_240_611
PICKS = 400  # a 1-in-9 instance is missed by 400 uniform picks with probability 3e-21


def _event(n: int) -> CloudEvent:
    return CloudEvent.create(source="/test/rebuilds", type="t", subject=f"key-{n}")


EVENTS = [_event(n) for n in range(PICKS)]

STRATEGIES: dict[str, Callable[[], Balancer]] = {
    "round_robin": RoundRobin,
    "random": lambda: Random(seed=SEED),
    "weighted": lambda: WeightedRandom(seed=SEED),
    "least_outstanding": lambda: LeastOutstanding(seed=SEED),
    "p2c": lambda: PowerOfTwoEWMA(seed=SEED, clock=FakeClock()),
    "hash": lambda: ConsistentHash("subject", vnodes=40),
}


def _make(name: str, wrapped: bool) -> Balancer:
    strategy = STRATEGIES[name]()
    return Ejector(strategy, clock=FakeClock()) if wrapped else strategy


def _picks(balancer: Balancer, instances: Sequence[Node]) -> Counter[str]:
    return Counter(balancer.choose(instances, event).instance_id for event in EVENTS)


CHANGES = ["new tuple", "list changed in place"]


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "in Ejector"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_an_added_instance_is_chosen_and_a_removed_one_never(
    name: str, wrapped: bool, change: str
) -> None:
    """Right after the list changes, a newcomer gets choices and a leaver gets none, whether
    the caller passes a new tuple or changes the same list object in place."""
    balancer = _make(name, wrapped)
    members = nodes(8)
    instances: Sequence[Node] = tuple(members) if change == "new tuple" else members
    assert set(_picks(balancer, instances)) == {n.instance_id for n in members}

    newcomer = Node("new")
    if isinstance(instances, list):
        instances.append(newcomer)
    else:
        instances = (*instances, newcomer)
    assert _picks(balancer, instances)["new"] > 0

    leaver = instances[3]
    if isinstance(instances, list):
        instances.remove(leaver)
    else:
        instances = tuple(n for n in instances if n is not leaver)
    after = _picks(balancer, instances)
    assert leaver.instance_id not in after
    assert set(after) == {n.instance_id for n in instances}


def test_an_equal_list_built_per_call_keeps_the_structures() -> None:
    """A fresh but equal list per call (as a caller filtering a snapshot builds) gives the
    same choices as passing one list: nothing observable changes, only the cost."""
    members = [Node(f"w{k}", weight=k) for k in range(1, 6)]
    once, fresh = WeightedRandom(seed=SEED), WeightedRandom(seed=SEED)
    assert [once.choose(members) for _ in range(500)] == [
        fresh.choose(list(members)) for _ in range(500)
    ]


def test_weighted_random_follows_a_weight_change() -> None:
    """An instance whose weight changes (same id, new object) gets its new share at once."""
    balancer = WeightedRandom(seed=SEED)
    before = [Node(f"n{k}") for k in range(4)]
    assert abs(_share(balancer, before, "n3") - 0.25) < 0.05
    after = [*before[:3], Node("n3", weight=5)]
    counts = Counter(balancer.choose(after).instance_id for _ in range(10_000))
    expected = {n.instance_id: 10_000 * n.weight / 8 for n in after}
    _, p_value = chi_square(counts, expected)
    assert p_value > 1e-4
    assert abs(counts["n3"] - 6_250) < binomial_bound(10_000, 5 / 8)


def _share(balancer: Balancer, instances: Sequence[Node], instance_id: str) -> float:
    return Counter(balancer.choose(instances).instance_id for _ in range(4000))[instance_id] / 4000


def test_a_heavy_newcomer_wins_the_very_next_weighted_choice() -> None:
    """Prefix sums are rebuilt before the first choice after the change, not later."""
    balancer = WeightedRandom(seed=SEED)
    light = tuple(nodes(4))
    for _ in range(100):
        balancer.choose(light)
    heavy = (*light, Node("heavy", weight=10**9))
    assert balancer.choose(heavy).instance_id == "heavy"
    assert "heavy" not in {balancer.choose(light).instance_id for _ in range(200)}


def test_least_outstanding_picks_an_idle_newcomer_at_once() -> None:
    """With every member busy, an instance that joins idle is the very next choice, and
    calls that start and end keep the groups exact."""
    balancer = LeastOutstanding(seed=SEED)
    members = nodes(5)
    for node in members:
        balancer.started(node)
    assert {balancer.choose(members).instance_id for _ in range(200)} == {
        n.instance_id for n in members
    }
    newcomer = Node("idle")
    members.append(newcomer)
    assert balancer.choose(members) is newcomer
    balancer.started(newcomer)
    balancer.started(newcomer)
    balancer.record(members[2], 0.01, True)
    assert {balancer.choose(members).instance_id for _ in range(50)} == {"n2"}
    members.remove(members[2])
    assert {balancer.choose(members).instance_id for _ in range(100)} == {
        "n0",
        "n1",
        "n3",
        "n4",
    }


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["choose", "start", "end", "join", "leave"]), st.integers(0, 9)),
        max_size=150,
    )
)
@example(steps=[("start", 0), ("start", 1), ("start", 2), ("start", 3), ("end", 2)])
def test_least_outstanding_always_picks_a_least_loaded_instance(
    steps: list[tuple[str, int]],
) -> None:
    """Property: whatever starts, ends, joins and leaves, the choice has the fewest calls in
    flight of the list it was chosen from (checked against a full scan)."""
    pool = nodes(10)
    balancer = LeastOutstanding(seed=SEED)
    members = pool[:4]
    for action, k in steps:
        node = pool[k]
        if action == "start":
            balancer.started(node)
        elif action == "end":
            balancer.record(node, 0.01, True)
        elif action == "join" and node not in members:
            members.append(node)
        elif action == "leave" and node in members and len(members) > 1:
            members.remove(node)
        chosen = balancer.choose(members)
        fewest = min(balancer.in_flight(n.instance_id) for n in members)
        assert chosen in members
        assert balancer.in_flight(chosen.instance_id) == fewest


def test_consistent_hash_maps_like_a_fresh_ring_after_each_change() -> None:
    """After a join, a leave and a weight change, every key goes where a ring built from
    scratch for the new list sends it."""
    balancer = ConsistentHash("subject", vnodes=40, weighted=True)
    lists = [
        nodes(6),
        [*nodes(6), Node("n6")],
        [n for n in [*nodes(6), Node("n6")] if n.instance_id != "n2"],
        [Node("n0", weight=3), *[n for n in nodes(6) if n.instance_id not in ("n0", "n2")]],
        nodes(6),
    ]
    for instances in lists:
        fresh = HashRing(vnodes=40)
        for node in instances:
            fresh.add(node.instance_id, float(node.weight))
        got = {e.subject: balancer.choose(instances, e).instance_id for e in EVENTS}
        assert got == {e.subject: fresh.lookup(e.subject or "") for e in EVENTS}


ids = st.sampled_from([f"n{k}" for k in range(8)])


@settings(max_examples=80, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.booleans(), ids, st.sampled_from([1.0, 1.0, 2.0, 0.5])), max_size=40
    ),
    keys=st.lists(st.text(max_size=8), min_size=1, max_size=30),
)
def test_a_changed_ring_answers_like_one_built_from_scratch(
    steps: list[tuple[bool, str, float]], keys: list[str]
) -> None:
    """Property: after any adds, removals, returns and weight changes (points of departed
    nodes left in place, joins inserted, sweeps), lookups and successor lists equal those
    of a ring built from the final members."""
    ring = HashRing(vnodes=8)
    members: dict[str, float] = {}
    for add, node, weight in steps:
        if add:
            ring.add(node, weight)
            members[node] = weight
        else:
            ring.remove(node)
            members.pop(node, None)
        if members:
            fresh = HashRing(vnodes=8)
            for member, w in members.items():
                fresh.add(member, w)
            assert [ring.lookup(k) for k in keys] == [fresh.lookup(k) for k in keys]
            assert ring.successors(keys[0], 3) == fresh.successors(keys[0], 3)
    assert ring.nodes == frozenset(members)


def test_p2c_prices_an_unmeasured_instance_at_the_mean_of_the_decayed_estimates() -> None:
    """An instance never measured costs the mean of the others' current (decayed)
    estimates, also after the running sum was re-anchored and after departed state went."""
    clock = FakeClock()
    balancer = PowerOfTwoEWMA(seed=SEED, clock=clock, decay=2.0)
    others = nodes(4)
    for step, (node, latency, ok) in enumerate(
        [(others[0], 0.4, True), (others[1], 1.2, True), (others[2], 0.1, False)]
    ):
        balancer.started(node)
        balancer.record(node, latency, ok)
        clock.advance(0.5 * step)
    balancer.record(others[0], 0.05, True)  # a faster sample: blended, not replaced
    measured = _check_mean_pricing(balancer, ["n0", "n1", "n2"], "a")
    clock.advance(2.0 * 400)  # beyond the re-anchoring horizon (300 time constants)
    balancer.record(others[1], 0.3, True)
    balancer.record(others[3], 0.9, True)
    _check_mean_pricing(balancer, [*measured, "n3"], "b")
    for k in range(100):
        balancer.record(Node(f"gone-{k}"), 30.0, True)
    balancer.choose(others[:2])  # more than 2n + 64 known: all but n0, n1 are forgotten
    _check_mean_pricing(balancer, ["n0", "n1"], "c")


def _check_mean_pricing(balancer: PowerOfTwoEWMA, measured: list[str], tag: str) -> list[str]:
    """Probe just above and just below the mean; returns the ids measured afterwards."""
    estimates = [balancer.latency(i) for i in measured]
    assert all(e is not None for e in estimates)
    mean = math.fsum(e for e in estimates if e is not None) / len(measured)
    unmeasured = Node(f"unmeasured-{tag}")
    for factor in (1.000001, 0.999999):
        probe = Node(f"probe-{tag}-{factor}")
        # A probe joins the mean once measured, so the unmeasured instance is the cheaper
        # one exactly when the probe is above the mean of the others.
        balancer.record(probe, mean * factor, True)
        winner = unmeasured if factor > 1 else probe
        assert balancer.choose([unmeasured, probe]) is winner
        assert balancer.choose([probe, unmeasured]) is winner
        mean = (mean * len(measured) + mean * factor) / (len(measured) + 1)
        measured = [*measured, probe.instance_id]
    return measured


def test_ejector_follows_ejections_on_one_unchanged_tuple() -> None:
    """The routing layer passes the same tuple for as long as the registry's snapshot
    lasts: each ejection and re-admission still takes effect on the very next choice."""
    clock = FakeClock()
    heavy = Node("heavy", weight=10**9)
    instances = (heavy, *nodes(5))
    balancer = Ejector(WeightedRandom(seed=SEED), consecutive_failures=2, clock=clock)
    assert balancer.choose(instances) is heavy
    balancer.record(heavy, 0.1, False)
    balancer.record(heavy, 0.1, False)
    assert _chosen(balancer, instances) == {"n0", "n1", "n2", "n3", "n4"}
    clock.advance(1.0)
    balancer.record(instances[1], 0.1, False)
    balancer.record(instances[1], 0.1, False)  # n0 goes too, one second later
    assert _chosen(balancer, instances) == {"n1", "n2", "n3", "n4"}
    clock.advance(balancer.base_ejection - 1.0)  # heavy's window ends, n0's not yet
    assert balancer.choose(instances) is heavy
    balancer.record(heavy, 0.1, True)
    clock.advance(1.0)
    assert balancer.statistics().ejected == ()
    assert _chosen(balancer, instances) == {"heavy"}


def _chosen(balancer: Balancer, instances: Sequence[Node]) -> set[str]:
    return {balancer.choose(instances).instance_id for _ in range(300)}


def test_round_robin_in_ejector_stays_exact_over_the_others() -> None:
    """With one of 5 ejected, round robin in the Ejector gives the other 4 exactly equal
    shares, and an instance joining meanwhile enters the rotation at once."""
    clock = FakeClock()
    balancer = Ejector(RoundRobin(), consecutive_failures=1, clock=clock)
    instances = tuple(nodes(5))
    balancer.choose(instances)
    balancer.record(instances[1], 0.1, False)
    picks = Counter(balancer.choose(instances).instance_id for _ in range(4 * 250))
    assert picks == {"n0": 250, "n2": 250, "n3": 250, "n4": 250}
    grown = (*instances, Node("n5"))
    picks = Counter(balancer.choose(grown).instance_id for _ in range(5 * 250))
    assert picks == {"n0": 250, "n2": 250, "n3": 250, "n4": 250, "n5": 250}


def test_weighted_random_in_ejector_keeps_the_others_proportions() -> None:
    """With the heaviest instance ejected, the rest share choices in proportion to their
    weights (chi-square), as a list without it would."""
    clock = FakeClock()
    instances = tuple(Node(f"w{w}", weight=w) for w in (1, 2, 3, 4))
    balancer = Ejector(WeightedRandom(seed=SEED), consecutive_failures=1, clock=clock)
    balancer.choose(instances)
    balancer.record(instances[3], 0.1, False)
    counts = Counter(balancer.choose(instances).instance_id for _ in range(10_000))
    assert "w4" not in counts
    expected = {n.instance_id: 10_000 * n.weight / 6 for n in instances[:3]}
    _, p_value = chi_square(counts, expected)
    assert p_value > 1e-4
