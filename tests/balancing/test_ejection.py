"""Outlier ejection: eject after N failures, re-admit after an exponential window, never all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom_ha.balancing import Ejector, LeastOutstanding, RoundRobin
from loom_ha.errors import ConfigurationError, NoHealthyInstanceError

from ._support import FakeClock, Node, nodes


def _ejector(clock: FakeClock, **kwargs: float) -> Ejector:
    options: dict[str, float] = {
        "consecutive_failures": 3,
        "base_ejection": 10.0,
        "max_ejection": 80.0,
        "max_ejected_fraction": 0.5,
    }
    options.update(kwargs)
    return Ejector(
        RoundRobin(),
        consecutive_failures=int(options["consecutive_failures"]),
        base_ejection=options["base_ejection"],
        max_ejection=options["max_ejection"],
        max_ejected_fraction=options["max_ejected_fraction"],
        clock=clock,
    )


def _fail(ejector: Ejector, node: Node, times: int) -> None:
    for _ in range(times):
        ejector.record(node, 0.05, False)


def _chosen(ejector: Ejector, instances: list[Node], n: int = 400) -> set[str]:
    return {ejector.choose(instances).instance_id for _ in range(n)}


def test_ejects_after_n_consecutive_failures() -> None:
    """Two failures leave an instance in rotation; the third takes it out."""
    clock, instances = FakeClock(), nodes(4)
    ejector = _ejector(clock)
    ejector.choose(instances)
    _fail(ejector, instances[0], 2)
    assert _chosen(ejector, instances) == {"n0", "n1", "n2", "n3"}
    _fail(ejector, instances[0], 1)
    assert ejector.statistics().ejected == ("n0",)
    assert _chosen(ejector, instances) == {"n1", "n2", "n3"}


def test_a_success_resets_the_failure_streak() -> None:
    """Failures must be consecutive: a success in between starts the count again."""
    clock, instances = FakeClock(), nodes(4)
    ejector = _ejector(clock)
    ejector.choose(instances)
    for _ in range(5):
        _fail(ejector, instances[0], 2)
        ejector.record(instances[0], 0.01, True)
    assert ejector.statistics().ejected == ()


def test_readmits_after_a_window_that_doubles_up_to_the_cap() -> None:
    """Windows grow 10, 20, 40, 80, 80 s and the instance returns when each one ends."""
    clock, instances = FakeClock(), nodes(4)
    ejector = _ejector(clock)
    ejector.choose(instances)
    for window in (10.0, 20.0, 40.0, 80.0, 80.0):
        _fail(ejector, instances[0], 3)
        assert ejector.is_ejected("n0")
        clock.advance(window - 0.001)
        assert ejector.is_ejected("n0")
        assert "n0" not in _chosen(ejector, instances, 50)
        clock.advance(0.001)
        assert not ejector.is_ejected("n0")
        assert "n0" in _chosen(ejector, instances, 8)
    stats = ejector.statistics()
    assert (stats.ejections, stats.readmissions) == (5, 5)


def test_a_healthy_spell_resets_the_window() -> None:
    """After max_ejection seconds back in service and a success, the next window is short again."""
    clock, instances = FakeClock(), nodes(4)
    ejector = _ejector(clock)
    ejector.choose(instances)
    for window in (10.0, 20.0):
        _fail(ejector, instances[0], 3)
        clock.advance(window)
    clock.advance(80.0)
    ejector.record(instances[0], 0.01, True)
    _fail(ejector, instances[0], 3)
    clock.advance(10.0)
    assert not ejector.is_ejected("n0")


def test_late_failures_do_not_extend_an_ejection() -> None:
    """Failures of calls sent before the ejection arrive later and leave the window as it was."""
    clock, instances = FakeClock(), nodes(4)
    ejector = _ejector(clock)
    ejector.choose(instances)
    _fail(ejector, instances[0], 3)
    clock.advance(5.0)
    _fail(ejector, instances[0], 10)
    clock.advance(5.0)
    assert not ejector.is_ejected("n0")
    assert ejector.statistics().ejections == 1


def test_never_ejects_more_than_the_max_fraction() -> None:
    """With every instance failing, at most half of 4 are ejected and choices still succeed."""
    clock, instances = FakeClock(), nodes(4)
    ejector = _ejector(clock)
    ejector.choose(instances)
    for node in instances:
        _fail(ejector, node, 3)
    stats = ejector.statistics()
    assert stats.ejected == ("n0", "n1")
    assert stats.suppressed == 2
    assert _chosen(ejector, instances) == {"n2", "n3"}


def test_a_lone_instance_is_never_ejected() -> None:
    """A service of one instance keeps it in rotation however often it fails."""
    clock, only = FakeClock(), Node("solo")
    ejector = _ejector(clock)
    ejector.choose([only])
    _fail(ejector, only, 50)
    assert ejector.choose([only]) is only
    assert ejector.statistics().ejected == ()


def test_shrinking_list_brings_back_the_instance_closest_to_readmission() -> None:
    """If the list shrinks below what the ejections allow, the soonest-to-return comes back."""
    clock, instances = FakeClock(), nodes(4)
    ejector = _ejector(clock)
    ejector.choose(instances)
    _fail(ejector, instances[0], 3)
    clock.advance(1.0)
    _fail(ejector, instances[1], 3)  # ejected until later than n0
    three = instances[:3]
    assert _chosen(ejector, three) == {"n0", "n2"}


def test_all_ejected_instances_left_but_list_is_not_empty() -> None:
    """A list holding only ejected instances still yields one (the limit applies to the list)."""
    clock, instances = FakeClock(), nodes(4)
    ejector = _ejector(clock)
    ejector.choose(instances)
    _fail(ejector, instances[0], 3)
    assert ejector.choose([instances[0]]) is instances[0]
    with pytest.raises(NoHealthyInstanceError):
        ejector.choose([])


def test_wraps_any_strategy_and_forwards_bookkeeping() -> None:
    """started/record reach the inner strategy, so least-outstanding still counts in flight."""
    inner = LeastOutstanding(seed=1)
    ejector = Ejector(inner, clock=FakeClock())
    node = Node("a")
    ejector.started(node)
    assert inner.in_flight("a") == 1
    ejector.record(node, 0.01, True)
    assert inner.in_flight("a") == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": 0},
        {"base_ejection": 0.0},
        {"base_ejection": 10.0, "max_ejection": 5.0},
        {"max_ejected_fraction": 1.0},
        {"max_ejected_fraction": -0.1},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    """Settings that could eject everyone or make no sense raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        Ejector(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=8),
    fraction=st.sampled_from([0.0, 0.1, 0.34, 0.5, 0.9]),
    steps=st.lists(st.tuples(st.integers(0, 7), st.booleans(), st.floats(0.0, 30.0)), max_size=120),
)
def test_choices_never_exclude_more_than_the_fraction(
    size: int, fraction: float, steps: list[tuple[int, bool, float]]
) -> None:
    """Property: whatever fails when, choose() succeeds and leaves out at most floor(f * n)."""
    clock, instances = FakeClock(), nodes(size)
    ejector = Ejector(
        RoundRobin(),
        consecutive_failures=2,
        base_ejection=5.0,
        max_ejection=40.0,
        max_ejected_fraction=fraction,
        clock=clock,
    )
    for index, ok, pause in steps:
        node = instances[index % size]
        ejector.choose(instances)
        ejector.record(node, 0.01, ok)
        clock.advance(pause)
        reachable = _chosen(ejector, instances, 2 * size)
        assert size - len(reachable) <= ejector.allowed(size)
        assert len(ejector.statistics().ejected) <= ejector.allowed(size)
