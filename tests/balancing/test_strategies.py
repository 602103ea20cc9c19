"""Round robin, random, weighted, least outstanding and P2C-EWMA, measured over many choices."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from loom_ha.balancing import (
    Balancer,
    HasInstanceId,
    LeastOutstanding,
    PowerOfTwoEWMA,
    Random,
    RoundRobin,
    WeightedRandom,
    track,
    weight_of,
)
from loom_ha.errors import ConfigurationError, NoHealthyInstanceError

from ._support import FakeClock, Node, binomial_bound, chi_square, chi_square_sf, nodes, simulate

CHOICES = 10_000
SEED = 20_240_611
ALPHA = 1e-4  # chance that a correct strategy fails the chi-square test with a new seed


def _counts(
    balancer: Balancer, instances: Sequence[HasInstanceId], n: int = CHOICES
) -> Counter[str]:
    return Counter(balancer.choose(instances).instance_id for _ in range(n))


def test_chi_square_helper_matches_table_values() -> None:
    """The closed-form chi-square tail matches textbook critical values (df 1-4)."""
    for df, critical in ((1, 10.828), (2, 13.816), (3, 16.266), (4, 18.467)):
        assert chi_square_sf(critical, df) == pytest.approx(0.001, rel=1e-3)


@pytest.mark.parametrize(
    "balancer",
    [
        RoundRobin(),
        Random(seed=1),
        WeightedRandom(seed=1),
        LeastOutstanding(seed=1),
        PowerOfTwoEWMA(seed=1),
    ],
    ids=lambda b: type(b).__name__,
)
def test_every_strategy_refuses_an_empty_list(balancer: Balancer) -> None:
    """Choosing among no instances raises NoHealthyInstanceError (also a LookupError)."""
    with pytest.raises(NoHealthyInstanceError):
        balancer.choose([])
    with pytest.raises(LookupError):
        balancer.choose([])


def test_round_robin_is_exact_over_ten_thousand_choices() -> None:
    """Round robin over 4 instances gives each exactly a quarter, in strict rotation."""
    instances = nodes(4)
    balancer = RoundRobin()
    picks = [balancer.choose(instances).instance_id for _ in range(CHOICES)]
    assert Counter(picks) == {n.instance_id: CHOICES // 4 for n in instances}
    assert all(picks[i] == f"n{i % 4}" for i in range(CHOICES))
    print("round robin:", dict(Counter(picks)))


def test_round_robin_carries_on_when_the_list_changes() -> None:
    """When an instance leaves, the rotation continues over the rest without skipping twice."""
    balancer = RoundRobin()
    four = nodes(4)
    assert [balancer.choose(four).instance_id for _ in range(2)] == ["n0", "n1"]
    three = [n for n in four if n.instance_id != "n1"]
    assert [balancer.choose(three).instance_id for _ in range(3)] == ["n3", "n0", "n2"]


def test_random_is_uniform_within_statistical_bounds() -> None:
    """Seeded random choice passes chi-square and stays within 5 binomial sd per instance."""
    instances = nodes(4)
    counts = _counts(Random(seed=SEED), instances)
    expected = {n.instance_id: CHOICES / 4 for n in instances}
    stat, p_value = chi_square(counts, expected)
    print(f"random: {dict(counts)} chi2={stat:.2f} p={p_value:.3f}")
    assert p_value > ALPHA
    bound = binomial_bound(CHOICES, 0.25)
    assert all(abs(counts[k] - e) < bound for k, e in expected.items())


def test_random_accepts_an_injected_rng_and_is_reproducible() -> None:
    """Two balancers with equally seeded random.Random objects make identical choices."""
    instances = nodes(5)
    first = [Random(random.Random(7)).choose(instances) for _ in range(1)]
    a, b = Random(random.Random(7)), Random(random.Random(7))
    assert [a.choose(instances) for _ in range(100)] == [b.choose(instances) for _ in range(100)]
    assert first[0] in instances
    with pytest.raises(ConfigurationError):
        Random(random.Random(1), seed=1)


def test_weighted_random_follows_weights_within_statistical_bounds() -> None:
    """Weights 1:2:3:4 give shares 10/20/30/40 % (chi-square, 5 binomial sd per instance)."""
    instances = [Node(f"w{w}", weight=w) for w in (1, 2, 3, 4)]
    counts = _counts(WeightedRandom(seed=SEED), instances)
    expected = {n.instance_id: CHOICES * n.weight / 10 for n in instances}
    stat, p_value = chi_square(counts, expected)
    print(f"weighted: {dict(counts)} chi2={stat:.2f} p={p_value:.3f}")
    assert p_value > ALPHA
    for n in instances:
        assert abs(counts[n.instance_id] - expected[n.instance_id]) < binomial_bound(
            CHOICES, n.weight / 10
        )


def test_meta_weight_overrides_the_weight_attribute() -> None:
    """meta["weight"] wins over .weight when valid; invalid or absent values fall back."""
    assert weight_of(Node("a", weight=2, meta={"weight": "5"})) == 5.0
    assert weight_of(Node("a", weight=2, meta={"weight": "zero"})) == 2.0
    assert weight_of(Node("a", weight=2, meta={"weight": "-1"})) == 2.0
    assert weight_of(Node("a", weight=3)) == 3.0
    assert weight_of(object()) == 1.0


def test_strategies_work_on_service_instances() -> None:
    """Registry ServiceInstances are choosable as they are, weights included."""
    from loom_ha.discovery.instance import ServiceInstance

    instances = [ServiceInstance(service="agent_1", instance_id=f"i{k}", weight=k) for k in (1, 3)]
    counts = _counts(WeightedRandom(seed=SEED), instances, 4000)
    assert abs(counts["i3"] - 3000) < binomial_bound(4000, 0.75)
    assert RoundRobin().choose(instances) is instances[0]


def _service_times(slow_id: str | None, fast: float, slow: float) -> Callable[[str, int], float]:
    """Exponentially distributed service times (seeded): mean `slow` for `slow_id`, else `fast`.

    Random service times keep a deterministic simulation from phase-locking.
    """
    rng = random.Random(SEED)
    return lambda instance_id, _n: rng.expovariate(1.0) * (slow if instance_id == slow_id else fast)


def test_least_outstanding_sends_fewer_requests_to_a_slow_instance() -> None:
    """An instance 10x slower holds more calls in flight and so gets far fewer new ones."""
    instances, clock = nodes(4), FakeClock()
    got = simulate(
        LeastOutstanding(seed=SEED),
        instances,
        requests=CHOICES,
        interarrival=0.004,
        service_time=_service_times("n3", 0.01, 0.1),
        clock=clock,
    )
    share = got["n3"] / CHOICES
    print(f"least outstanding: {dict(got)} slow share={share:.3f}")
    assert share < 0.25 / 2
    assert min(got[f"n{i}"] for i in range(3)) > 2 * got["n3"]


def test_least_outstanding_counts_in_flight_and_never_goes_negative() -> None:
    """started() and record() move the in-flight count; extra records stop at zero."""
    balancer, node = LeastOutstanding(seed=1), Node("a")
    balancer.started(node)
    balancer.started(node)
    assert balancer.in_flight("a") == 2
    for _ in range(3):
        balancer.record(node, 0.01, True)
    assert balancer.in_flight("a") == 0


def test_least_outstanding_prefers_the_idle_instance() -> None:
    """With one instance busy, every choice goes to the idle ones."""
    balancer, instances = LeastOutstanding(seed=1), nodes(3)
    balancer.started(instances[0])
    picks = {balancer.choose(instances).instance_id for _ in range(200)}
    assert picks == {"n1", "n2"}


def test_p2c_ewma_moves_load_away_from_an_instance_that_turns_slow() -> None:
    """When one of 4 instances becomes 10x slower, its share drops far below a quarter."""
    instances, clock = nodes(4), FakeClock()
    balancer = PowerOfTwoEWMA(seed=SEED, clock=clock, decay=1.0)
    half = CHOICES // 2
    before = simulate(
        balancer,
        instances,
        requests=half,
        interarrival=0.004,
        service_time=_service_times(None, 0.01, 0.1),
        clock=clock,
    )
    after = simulate(
        balancer,
        instances,
        requests=half,
        interarrival=0.004,
        service_time=_service_times("n3", 0.01, 0.1),
        clock=clock,
    )
    share_before, share_after = before["n3"] / half, after["n3"] / half
    print(f"p2c-ewma: before {dict(before)} after {dict(after)}")
    print(f"p2c-ewma: slow instance share {share_before:.3f} -> {share_after:.3f}")
    assert abs(before["n3"] - half / 4) < binomial_bound(half, 0.25)
    assert share_after < share_before / 3
    assert balancer.latency("n3") is not None
    assert balancer.latency("n3") > balancer.latency("n0")  # type: ignore[operator]


def test_p2c_ewma_charges_failures_and_forgets_with_time() -> None:
    """A fast failure counts as failure_latency, and an idle estimate decays toward zero."""
    clock = FakeClock()
    balancer = PowerOfTwoEWMA(seed=1, clock=clock, decay=2.0, failure_latency=3.0)
    node = Node("a")
    balancer.started(node)
    balancer.record(node, 0.001, False)
    assert balancer.latency("a") == pytest.approx(3.0)
    clock.advance(2.0)
    assert balancer.latency("a") == pytest.approx(3.0 * math.exp(-1.0))


def test_p2c_ewma_never_picks_the_same_instance_twice_in_a_pair() -> None:
    """With two instances, the slower one is never chosen: both are always compared."""
    clock = FakeClock()
    balancer, (fast, slow) = PowerOfTwoEWMA(seed=SEED, clock=clock), nodes(2)
    for node, latency in ((fast, 0.01), (slow, 0.5)):
        balancer.started(node)
        balancer.record(node, latency, True)
    assert {balancer.choose([fast, slow]).instance_id for _ in range(500)} == {"n0"}


def test_track_records_latency_and_failures() -> None:
    """track() brackets a call: in flight inside, recorded with its duration and outcome."""
    clock = FakeClock()
    balancer, node = PowerOfTwoEWMA(seed=1, clock=clock), Node("a")
    with track(balancer, node, clock=clock):
        assert balancer.in_flight("a") == 1
        clock.advance(0.25)
    assert balancer.in_flight("a") == 0
    assert balancer.latency("a") == pytest.approx(0.25)
    with pytest.raises(RuntimeError), track(balancer, node, clock=clock):
        raise RuntimeError("boom")
    assert balancer.in_flight("a") == 0
    assert balancer.latency("a") == pytest.approx(balancer.failure_latency)


def test_learning_state_of_departed_instances_is_dropped() -> None:
    """Instances that leave (new ids per restart) do not accumulate state forever."""
    balancer = LeastOutstanding(seed=1)
    for generation in range(500):
        node = Node(f"pod-{generation}")
        balancer.started(node)
        balancer.choose([node])
    assert balancer.in_flight("pod-0") == 0
    assert balancer.in_flight("pod-499") == 1
