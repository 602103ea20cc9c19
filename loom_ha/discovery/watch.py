"""Watches: one query loop per watched service (`WatchFeed`), shared by every `Watch` of it.

A registry runs one feed per service however many watchers ask (a Consul blocking query
holds an HTTP connection to the agent, and the agent limits connections per client IP).
The feed asks with the last index, applies Consul's index rules, passes on only real
changes, and while the backend is unreachable passes the last snapshot once marked stale,
then retries with jittered backoff until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, Self, TypeVar

from loom_ha._tasks import TaskSupervisor
from loom_ha.discovery.instance import ServiceInstance, ServiceSnapshot
from loom_ha.errors import ConfigurationError, RegistryError, RegistryUnavailableError
from loom_ha.retry import backoff_delay

__all__ = ["Watch", "WatchFeed", "WatchHub", "WatchSource", "next_index"]

T = TypeVar("T")

# Longest pause between two attempts while the backend is unreachable.
_BACKOFF_CAP = 2.0

log = logging.getLogger("loom_ha.discovery")


class WatchSource(Protocol):
    """What a feed needs of its registry (`ServiceRegistry` provides it)."""

    watch_wait: float
    timeout: float

    @property
    def closed(self) -> bool: ...
    async def _call(self, operation: Awaitable[T], limit: float, *, queued: bool = True) -> T: ...
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


class WatchFeed:
    """The query loop of one service, passing every change to the watches that follow it."""

    def __init__(
        self, source: WatchSource, service: str, on_failure: Callable[[], None] = lambda: None
    ) -> None:
        self.service = service
        self._on_failure = on_failure
        self.latest: ServiceSnapshot | None = None  # every instance, any health
        self.index = 0
        self.failures = 0
        self.queries = 0
        self.error: RegistryError | None = None
        self.ended = False
        self.watches: set[Watch] = set()
        self._source = source
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Query until cancelled, the registry closes, or a non-transient error."""
        source = self._source
        try:
            while not source.closed:
                if self.failures:
                    await source._sleep_unless_closed(
                        backoff_delay(self.failures, cap=_BACKOFF_CAP)
                    )
                    if source.closed:
                        return
                wait = source.watch_wait
                # Consul adds up to wait/16 of jitter to a blocking query; then a normal call.
                deadline = wait + wait / 16 + source.timeout
                self.queries += 1
                try:
                    index, found = await source._call(
                        source._query(self.service, self.index, wait), deadline, queued=False
                    )
                except RegistryUnavailableError as exc:
                    self.failures += 1
                    self._on_failure()
                    if self.failures == 1:  # once per outage; the snapshot turns stale
                        log.warning("watch of %s: %s (retrying)", self.service, exc)
                    # After an outage ask for a full answer: the backend may have been rebuilt.
                    self.index = 0
                    if self.latest is None or not self.latest.stale:
                        last = self.latest or ServiceSnapshot(
                            service=self.service, instances=(), index=0
                        )
                        self._publish(last.as_stale(str(exc)))
                    continue
                except RegistryError as exc:
                    self.error = exc
                    return
                if self.failures:
                    log.info("watch of %s answers again", self.service)
                self.failures = 0
                self.index = next_index(self.index, index)
                snap = source._remember(self.service, index, found)
                if not snap.same_as(self.latest):
                    self._publish(snap)
        finally:
            self.ended = True
            for watch in list(self.watches):
                watch._wake()

    def _publish(self, snap: ServiceSnapshot) -> None:
        self.latest = snap
        for watch in list(self.watches):
            watch._offer(snap)


class WatchHub:
    """The feeds of one registry: started by the first watch of a service, stopped by its last.

    Args:
        source: the registry.
        tasks: owns the feed tasks (the registry cancels them on close).
        limit: most services watched at once (None: no limit).
    """

    def __init__(self, source: WatchSource, tasks: TaskSupervisor, *, limit: int | None) -> None:
        self.feeds: dict[str, WatchFeed] = {}
        self.limit = limit
        self.failed_queries = 0  # every watch query the registry did not answer
        self._source = source
        self._tasks = tasks

    @property
    def watches(self) -> int:
        """Open watches, over every service."""
        return sum(len(feed.watches) for feed in self.feeds.values())

    def watch(self, service: str, *, passing_only: bool) -> Watch:
        """A new watch of `service`, following the service's feed (started if needed).

        Raises:
            ConfigurationError: starting a feed would pass `limit`.
        """
        feed = self.feeds.get(service)
        if feed is None or feed.ended:  # an ended feed (non-transient error) is not reused
            if feed is None and self.limit is not None and len(self.feeds) >= self.limit:
                raise ConfigurationError(
                    f"cannot watch {service!r}: this registry already watches {len(self.feeds)} "
                    f"services (max_watches={self.limit}); each holds one connection for its "
                    "blocking query, so raise max_watches only within the server's "
                    "per-client connection limit"
                )
            feed = self.feeds[service] = WatchFeed(self._source, service, self._failed)
            feed.task = self._tasks.spawn(feed.run(), name=f"watch:{service}")
        watch = Watch(self, feed, passing_only=passing_only)
        feed.watches.add(watch)
        if feed.latest is not None:
            watch._offer(feed.latest)
        return watch

    def _failed(self) -> None:
        self.failed_queries += 1

    async def release(self, watch: Watch) -> None:
        """`watch` ended; stop its feed when it was the last one."""
        feed = watch._feed
        feed.watches.discard(watch)
        if feed.watches or self.feeds.get(feed.service) is not feed:
            return
        del self.feeds[feed.service]
        if feed.task is not None and feed.task is not asyncio.current_task():
            await self._tasks.cancel(feed.task)


class Watch:
    """Snapshots of one service: the current one first, then one per change.

    A snapshot is yielded only when the instances (ignoring heartbeat times) or the stale
    flag changed; a consumer slower than the changes gets the newest one. Iteration ends
    when `aclose()` is called or the registry closes; a non-transient `RegistryError`
    (e.g. an ACL denial) is raised to the iterating task.
    """

    def __init__(self, hub: WatchHub, feed: WatchFeed, *, passing_only: bool) -> None:
        self.service = feed.service
        self.passing_only = passing_only
        self.latest: ServiceSnapshot | None = None
        self._hub = hub
        self._feed = feed
        self._pending: ServiceSnapshot | None = None
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def index(self) -> int:
        """The index the service's next query blocks on (0: answer at once)."""
        return self._feed.index

    @property
    def failures(self) -> int:
        """Failed queries in a row of the service's feed."""
        return self._feed.failures

    def _offer(self, snap: ServiceSnapshot) -> None:
        view = snap.passing() if self.passing_only else snap
        if view.same_as(self._pending or self.latest):
            return
        self._pending = view
        self._changed.set()

    def _wake(self) -> None:
        self._changed.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ServiceSnapshot:
        feed = self._feed
        while True:
            if self._closed or feed._source.closed:
                await self.aclose()
                raise StopAsyncIteration
            pending, self._pending = self._pending, None
            if pending is not None and not pending.same_as(self.latest):
                self.latest = pending
                return pending
            if feed.ended:
                await self.aclose()
                if feed.error is not None:
                    raise feed.error
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()

    async def aclose(self) -> None:
        """End the iteration; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        await self._hub.release(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
