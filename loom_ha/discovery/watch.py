"""`Watch`: an async iterator of a service's snapshots, driven by blocking queries.

The same loop serves every backend: ask with the last index, apply Consul's index rules,
yield only real changes, and while the backend is unreachable yield the last snapshot once
marked stale, then retry with jittered backoff until it answers again.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, Self, TypeVar

from loom_ha.discovery.instance import ServiceInstance, ServiceSnapshot
from loom_ha.errors import RegistryError, RegistryUnavailableError
from loom_ha.retry import backoff_delay

__all__ = ["Watch", "WatchSource", "next_index"]

T = TypeVar("T")

# Longest pause between two attempts while the backend is unreachable.
_BACKOFF_CAP = 2.0


class WatchSource(Protocol):
    """What a `Watch` needs of its registry (`ServiceRegistry` provides it)."""

    watch_wait: float
    timeout: float
    _watches: set[Watch]

    @property
    def closed(self) -> bool: ...
    async def _call(self, operation: Awaitable[T], limit: float) -> T: ...
    async def _query(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[ServiceInstance]]: ...
    def _remember(
        self, service: str, index: int, found: list[ServiceInstance]
    ) -> ServiceSnapshot: ...
    async def _sleep_unless_closed(self, delay: float) -> None: ...


def next_index(previous: int, returned: int) -> int:
    """The index to block on next, after a query with `previous` answered `returned`.

    Consul's blocking-query rules (consul PR #2621, #7939): an index that goes backwards
    means the state was reset (snapshot restore, new cluster): start again from 0, which
    asks for a full answer at once; otherwise never block on an index below 1, which
    would return immediately forever and spin.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


class Watch:
    """Snapshots of one service: the current one first, then one per change.

    A snapshot is yielded only when the instances (ignoring heartbeat times) or the stale
    flag changed. Iteration ends when `aclose()` is called or the registry closes; a
    non-transient `RegistryError` (e.g. an ACL denial) is raised to the iterating task.
    """

    def __init__(self, registry: WatchSource, service: str, *, passing_only: bool) -> None:
        self.service = service
        self.passing_only = passing_only
        self.latest: ServiceSnapshot | None = None
        self.failures = 0
        self._registry = registry
        self._index = 0
        self._closed = False
        registry._watches.add(self)

    @property
    def index(self) -> int:
        """The index the next query blocks on (0: answer at once)."""
        return self._index

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ServiceSnapshot:
        registry = self._registry
        while True:
            if self._closed or registry.closed:
                await self.aclose()
                raise StopAsyncIteration
            if self.failures:
                await registry._sleep_unless_closed(backoff_delay(self.failures, cap=_BACKOFF_CAP))
                if self._closed or registry.closed:
                    continue
            wait = registry.watch_wait
            # Consul adds up to wait/16 of jitter to a blocking query; then allow a normal call.
            deadline = wait + wait / 16 + registry.timeout
            try:
                index, found = await registry._call(
                    registry._query(self.service, self._index, wait), deadline
                )
            except RegistryUnavailableError as exc:
                if self._closed or registry.closed:
                    continue
                self.failures += 1
                # After an outage ask for a full answer: the backend may have been rebuilt.
                self._index = 0
                if self.latest is None or not self.latest.stale:
                    last = self.latest or ServiceSnapshot(
                        service=self.service, instances=(), index=0
                    )
                    self.latest = last.as_stale(str(exc))
                    return self.latest
                continue
            except RegistryError:
                await self.aclose()
                raise
            self.failures = 0
            self._index = next_index(self._index, index)
            snap = registry._remember(self.service, index, found)
            if self.passing_only:
                snap = snap.passing()
            if snap.same_as(self.latest):
                continue
            self.latest = snap
            return snap

    async def aclose(self) -> None:
        """End the iteration; idempotent."""
        self._closed = True
        self._registry._watches.discard(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
