"""Consistent hashing: affinity, even spread, minimal reshuffling, and ring properties."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_ha.balancing import ConsistentHash, Ejector, HashRing, RoundRobin, stable_hash
from loom_ha.errors import ConfigurationError, NoHealthyInstanceError
from loom_ha.event import CloudEvent

from ._support import FakeClock, Node, binomial_bound, nodes

KEYS = [f"session-{i}" for i in range(10_000)]
VNODES = 160
SIGMAS = 5.0


def _event(subject: str | None = None, **extensions: str) -> CloudEvent:
    event = CloudEvent.create(source="/test/balancing", type="t", subject=subject)
    event.extensions.update(extensions)
    return event


def _share_bound(n: int, keys: int) -> float:
    """Tolerance on one node's key share: SIGMAS times the sd of ring arcs and of sampling.

    A node's arc is a sum of VNODES arcs of mean 1/(n*VNODES), so its sd is about
    1/(n*sqrt(VNODES)); sampling `keys` keys adds a binomial sd.
    """
    p = 1.0 / n
    ring_sd = p / math.sqrt(VNODES)
    sample_sd = math.sqrt(p * (1 - p) / keys)
    return SIGMAS * math.hypot(ring_sd, sample_sd)


def _mapping(ring: HashRing, keys: list[str]) -> dict[str, str]:
    return {k: ring.lookup(k) for k in keys}


def test_stable_hash_is_pinned() -> None:
    """The hash is blake2b-64 and never changes (a change would move every session)."""
    assert stable_hash("loom") == stable_hash(b"loom") == 0x34ECCF72FB136611
    assert stable_hash("loom") != stable_hash("loom ")


def test_same_key_always_reaches_the_same_instance() -> None:
    """Every event with a given subject goes to one instance, whatever the call order."""
    instances = nodes(5)
    balancer = ConsistentHash("subject", vnodes=VNODES)
    first = {k: balancer.choose(instances, _event(k)).instance_id for k in KEYS[:2000]}
    again = {k: balancer.choose(instances[::-1], _event(k)).instance_id for k in KEYS[:2000]}
    assert first == again
    assert ConsistentHash("subject").choose(instances, _event("x")) == balancer.choose(
        instances, _event("x")
    )


def test_keys_spread_evenly_over_instances() -> None:
    """Over 10,000 keys each of 5 instances owns about a fifth (ring and sampling sd)."""
    ring = HashRing([n.instance_id for n in nodes(5)], vnodes=VNODES)
    counts = Counter(_mapping(ring, KEYS).values())
    print("hash spread:", dict(sorted(counts.items())))
    bound = _share_bound(5, len(KEYS))
    assert all(abs(c / len(KEYS) - 0.2) < bound for c in counts.values())


@pytest.mark.parametrize("n", [4, 5, 10])
def test_one_instance_leaving_moves_only_its_share_of_keys(n: int) -> None:
    """When one of N instances leaves, only its keys move: about 1/N of 10,000."""
    ids = [f"n{i}" for i in range(n)]
    ring = HashRing(ids, vnodes=VNODES)
    before = _mapping(ring, KEYS)
    ring.remove(ids[1])
    after = _mapping(ring, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    fraction = len(moved) / len(KEYS)
    print(f"{n} instances, one leaves: {fraction:.4f} of keys moved (ideal {1 / n:.4f})")
    assert all(before[k] == ids[1] for k in moved)
    assert all(after[k] != ids[1] for k in KEYS)
    assert abs(fraction - 1 / n) < _share_bound(n, len(KEYS))


def test_one_instance_joining_takes_about_its_share_and_nothing_else_moves() -> None:
    """A 6th instance takes about 1/6 of the keys, all of them moving to it."""
    ring = HashRing([f"n{i}" for i in range(5)], vnodes=VNODES)
    before = _mapping(ring, KEYS)
    ring.add("n5")
    after = _mapping(ring, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    print(f"5 -> 6 instances: {len(moved) / len(KEYS):.4f} of keys moved (ideal 0.1667)")
    assert all(after[k] == "n5" for k in moved)
    assert abs(len(moved) / len(KEYS) - 1 / 6) < _share_bound(6, len(KEYS))


def test_balancer_follows_the_instance_list() -> None:
    """ConsistentHash rebuilds its ring from each list: a departed instance is never chosen."""
    instances = nodes(4)
    balancer = ConsistentHash(vnodes=VNODES)
    before = {k: balancer.choose(instances, _event(k)).instance_id for k in KEYS[:3000]}
    remaining = [n for n in instances if n.instance_id != "n2"]
    after = {k: balancer.choose(remaining, _event(k)).instance_id for k in KEYS[:3000]}
    assert "n2" not in after.values()
    assert all(before[k] == after[k] for k in KEYS[:3000] if before[k] != "n2")
    back = {k: balancer.choose(instances, _event(k)).instance_id for k in KEYS[:3000]}
    assert back == before


def test_extension_key_and_key_function() -> None:
    """An extension name ("session") or a function can be the key; missing keys use the fallback."""
    instances = nodes(3)
    by_session = ConsistentHash("session")
    owner = by_session.choose(instances, _event("a", session="s-42"))
    assert all(
        by_session.choose(instances, _event(f"x{i}", session="s-42")) == owner for i in range(50)
    )
    by_func = ConsistentHash(lambda e: e.source + (e.subject or ""))
    assert by_func.key_of(_event("s")) == "/test/balancing" + "s"
    keyless = ConsistentHash("session", fallback=RoundRobin())
    picks = [keyless.choose(instances, _event("a")).instance_id for _ in range(6)]
    assert picks == ["n0", "n1", "n2"] * 2
    assert keyless.choose(instances).instance_id == "n0"


def test_weighted_ring_gives_heavier_instances_more_keys() -> None:
    """With weighted=True an instance of weight 3 owns about three times the keys of weight 1."""
    instances = [Node("light"), Node("heavy", weight=3)]
    balancer = ConsistentHash("subject", weighted=True, vnodes=VNODES)
    counts = Counter(balancer.choose(instances, _event(k)).instance_id for k in KEYS)
    print("weighted ring:", dict(counts))
    # The light node holds VNODES of 4 * VNODES points: its arc has sd sqrt(VNODES) / (4 VNODES).
    ring_sd = math.sqrt(VNODES) / (4 * VNODES) * len(KEYS)
    bound = SIGMAS * math.hypot(ring_sd, binomial_bound(len(KEYS), 0.75, sigmas=1.0))
    assert abs(counts["heavy"] - 0.75 * len(KEYS)) < bound


def test_successors_give_distinct_fallbacks_in_ring_order() -> None:
    """successors() starts with the owner and lists where the key goes if the owner leaves."""
    ring = HashRing([f"n{i}" for i in range(4)], vnodes=VNODES)
    chain = ring.successors("session-7", 4)
    assert len(set(chain)) == 4 and chain[0] == ring.lookup("session-7")
    ring.remove(chain[0])
    assert ring.lookup("session-7") == chain[1]
    assert ring.successors("session-7", 10) == chain[1:]


def test_empty_ring_and_bad_settings_raise() -> None:
    """An empty ring has no owner for any key, and bad vnodes or weights are refused."""
    with pytest.raises(NoHealthyInstanceError):
        HashRing().lookup("k")
    with pytest.raises(ConfigurationError):
        HashRing(vnodes=0)
    with pytest.raises(ConfigurationError):
        HashRing().add("a", weight=0)


def test_ejected_instance_keys_move_and_come_back() -> None:
    """Under an Ejector, an ejected instance's sessions move and return after the window."""
    clock = FakeClock()
    instances = nodes(4)
    balancer = Ejector(
        ConsistentHash(vnodes=VNODES), consecutive_failures=2, base_ejection=5.0, clock=clock
    )
    before = {k: balancer.choose(instances, _event(k)).instance_id for k in KEYS[:2000]}
    for _ in range(2):
        balancer.record(instances[0], 0.1, False)
    during = {k: balancer.choose(instances, _event(k)).instance_id for k in KEYS[:2000]}
    assert "n0" not in during.values()
    assert all(during[k] == before[k] for k in KEYS[:2000] if before[k] != "n0")
    clock.advance(5.0)
    assert {k: balancer.choose(instances, _event(k)).instance_id for k in KEYS[:2000]} == before


ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    members=st.sets(ids, min_size=1, max_size=8),
    extra=ids,
    keys=st.lists(st.text(max_size=20), min_size=1, max_size=200),
)
def test_adding_then_removing_an_instance_restores_the_mapping(
    members: set[str], extra: str, keys: list[str]
) -> None:
    """Property: add then remove one instance and every key maps exactly as before."""
    ring = HashRing(sorted(members), vnodes=16)
    before = _mapping(ring, keys)
    if extra in members:
        ring.remove(extra)
        ring.add(extra)
    else:
        ring.add(extra)
        during = _mapping(ring, keys)
        assert all(during[k] in (before[k], extra) for k in keys)  # moves only to the newcomer
        ring.remove(extra)
    assert _mapping(ring, keys) == before


@settings(max_examples=40, deadline=None)
@given(
    members=st.lists(ids, min_size=1, max_size=8, unique=True),
    keys=st.lists(st.text(), max_size=50),
)
def test_ring_depends_only_on_its_members(members: list[str], keys: list[str]) -> None:
    """Property: the insertion order of instances never changes the mapping."""
    forward = HashRing(members, vnodes=16)
    backward = HashRing(reversed(members), vnodes=16)
    assert _mapping(forward, keys) == _mapping(backward, keys)
