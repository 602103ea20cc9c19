"""`InFlightGroups`: the positions of an instance list grouped by calls in flight.

Least outstanding reads the lowest group in O(1) instead of scanning every instance;
`started`/`record` move one position between neighbouring groups in O(1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from loom_ha.balancing.base import HasInstanceId

__all__ = ["InFlightGroups"]


class InFlightGroups:
    """Positions in one instance list, grouped by their in-flight count.

    Built once per distinct list (O(n)); kept in step by `move` as calls start and end.
    Each group is an unordered list (removal swaps with the last element), so a uniform
    pick among the least loaded is one random index.

    Args:
        instances: the list the positions refer to; a repeated id keeps its first place.
        in_flight: the current count of an instance id.
    """

    __slots__ = ("_groups", "_lowest", "_position", "_slot")

    def __init__(self, instances: Sequence[HasInstanceId], in_flight: Callable[[str], int]) -> None:
        self._position: dict[str, int] = {}
        for index, instance in enumerate(instances):
            self._position.setdefault(instance.instance_id, index)
        self._groups: dict[int, list[int]] = {}
        self._slot: dict[int, int] = {}  # position -> its index inside its group
        for instance_id, index in self._position.items():
            self._add(index, in_flight(instance_id))
        self._lowest = min(self._groups, default=0)

    def fewest(self) -> list[int]:
        """Positions with the fewest calls in flight (never empty for a non-empty list)."""
        return self._groups[self._lowest]

    def move(self, instance_id: str, before: int, after: int) -> None:
        """`instance_id` went from `before` to `after` calls in flight (ids not in the
        list are ignored: they belong to another list)."""
        index = self._position.get(instance_id)
        if index is None:
            return
        group = self._groups[before]
        slot, last = self._slot[index], group[-1]
        group[slot], self._slot[last] = last, slot
        group.pop()
        if not group:
            del self._groups[before]
        self._add(index, after)
        if after < self._lowest:
            self._lowest = after
        elif before == self._lowest and not group:
            # Counts move by one, so the next group up is `after`'s, which is not empty.
            self._lowest = after if after == before + 1 else min(self._groups)

    def _add(self, index: int, count: int) -> None:
        group = self._groups.get(count)
        if group is None:
            group = self._groups[count] = []
        self._slot[index] = len(group)
        group.append(index)
