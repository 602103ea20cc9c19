"""RedisTransport: one Redis connection setup, each topic in the mode its pattern selects.

The mode is chosen per transport (``mode=``) and overridden per topic pattern
(``topic_modes=``), e.g. durable requests with low-latency replies::

    RedisTransport(url, mode="streams", topic_modes={"node.response/*": "pubsub"})

Each mode is run by its own transport class (`RedisStreamsTransport`,
`RedisPubSubTransport`) on one shared `RedisConnector`: one command pool, one
Sentinel watcher, one master for both. Rules are per topic, not per
subscription, so publishers and subscribers with the same rules always agree.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from typing import Any

from typing_extensions import override

from loom_ha._handlers import Handler
from loom_ha._state import StateCell
from loom_ha.errors import LoomHAError, UnsupportedCapabilityError
from loom_ha.redis._base import (
    Encoded,
    RedisLifecycle,
    RedisTransportBase,
    detach_modes,
    start_modes,
)
from loom_ha.redis.connection import RedisConnector
from loom_ha.redis.pubsub import RedisPubSubTransport
from loom_ha.redis.streams import RedisStreamsTransport
from loom_ha.redis.topic_modes import Mode, ModeRouter, weakest
from loom_ha.topics import validate_topic
from loom_ha.transport import TransportState, TransportStatistics, require_usable


def _own_options(cls: type[RedisTransportBase]) -> frozenset[str]:
    """Keyword options `cls` adds to the shared ones of `RedisTransportBase`."""
    shared = set(inspect.signature(RedisTransportBase.__init__).parameters)
    return frozenset(set(inspect.signature(cls.__init__).parameters) - shared - {"options"})


_MODE_CLASSES: dict[Mode, type[RedisTransportBase]] = {
    "streams": RedisStreamsTransport,
    "pubsub": RedisPubSubTransport,
}
_MODE_OPTIONS: dict[Mode, frozenset[str]] = {m: _own_options(c) for m, c in _MODE_CLASSES.items()}

# Summed over the modes in statistics(); the rest is computed once for the transport.
_OWN_FIELDS = frozenset({"backend", "state", "endpoint", "reconnects", "extra"})


class RedisTransport(RedisLifecycle):
    """Loom topics over Redis, each topic in Streams or Pub/Sub mode.

    A topic's mode is that of the most specific `topic_modes` pattern matching it
    (an exact topic first, then the longest fixed part), else `mode`. A
    subscription pattern that matches topics of both modes subscribes in both and
    receives the events of each (every event still arrives once: a topic travels
    in one mode only). Publishers and subscribers must use the same rules.

    `capabilities` state what holds for *every* topic: with both modes in use,
    the weaker of each guarantee (not persistent, no competing consumers, ...),
    and ``at_least_once`` because streams topics may be redelivered.

    Args:
        url: ``redis://``, ``rediss://`` or ``redis+sentinel://`` (see `loom_ha.redis.url`).
        mode: ``"streams"`` (durable, at-least-once, groups) or ``"pubsub"``
            (at-most-once, lowest latency) for topics no override names.
        topic_modes: ``{pattern: mode}`` overrides, e.g. ``{"node.response/*": "pubsub"}``.
        **options: connection and codec options (both modes), plus the options of
            `RedisStreamsTransport` and `RedisPubSubTransport`, each given to its mode.

    Raises:
        ConfigurationError: an unknown mode, an invalid or ambiguous `topic_modes`
            pattern, or a bad option; the message names it.
    """

    backend = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        mode: str = "streams",
        topic_modes: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        self.router = ModeRouter(mode, topic_modes)
        shared = {
            k: v for k, v in options.items() if not any(k in o for o in _MODE_OPTIONS.values())
        }
        # Both modes are built (so every option is validated); only the used ones connect.
        self._modes: dict[Mode, RedisTransportBase] = {
            m: cls(url, **shared, **{k: v for k, v in options.items() if k in _MODE_OPTIONS[m]})
            for m, cls in _MODE_CLASSES.items()
        }
        self._used = [self._modes[m] for m in self.router.modes]
        self.capabilities = weakest(t.capabilities for t in self._used)
        self._cell = StateCell(f"loom_ha.{self.backend}")
        self._state_lock = asyncio.Lock()
        self._connector: RedisConnector | None = None
        self._unwatch: list[Callable[[], None]] = []  # our listeners on the modes' states

    def _mode_changed(self, _: TransportState) -> None:
        """RECONNECTING while any mode in use is, CONNECTED once all are again."""
        state = self._cell.state
        if state not in (TransportState.CONNECTED, TransportState.RECONNECTING):
            return
        modes = [m.state for m in self._used]
        all_up = all(m is TransportState.CONNECTED for m in modes)
        self._cell.set(TransportState.CONNECTED if all_up else TransportState.RECONNECTING)

    @property
    def mode(self) -> Mode:
        """The mode of topics no `topic_modes` pattern names."""
        return self.router.default

    def transport_for(self, mode: Mode) -> RedisTransportBase:
        """The transport running `mode` (for its settings and mode-specific statistics)."""
        return self._modes[mode]

    # -- lifecycle -------------------------------------------------------------------------------

    @override
    async def _start(self) -> None:
        """Find the master once and start every mode in use on it (one shared connector)."""
        self._connector = await start_modes(self._used)
        self._cell.set(TransportState.CONNECTED)
        self._unwatch = [m.add_state_listener(self._mode_changed) for m in self._used]
        self._mode_changed(TransportState.CONNECTED)  # a mode lost meanwhile?

    @override
    async def disconnect(self) -> None:
        """Stop both modes and close every socket; finishes even when cancelled."""
        if self._state in (TransportState.NEW, TransportState.DISCONNECTED, TransportState.CLOSED):
            return
        self._cell.set(TransportState.DISCONNECTED)
        unwatch, self._unwatch = self._unwatch, []
        for remove in unwatch:
            remove()
        connector, self._connector = self._connector, None
        try:
            await detach_modes(self._used)
        finally:
            if connector is not None:
                await connector.close()

    @override
    def resolve_group(self, pattern: str, group: str | None) -> str | None:
        """A group only where every mode the pattern travels in has competing consumers."""
        groups = {
            self._modes[m].resolve_group(pattern, group) for m in self.router.modes_for(pattern)
        }
        return groups.pop() if len(groups) == 1 else None

    # -- Transport -------------------------------------------------------------------------------

    @override
    async def publish(self, topic: str, event: Any) -> None:
        """Publish in the topic's mode, with that mode's promise.

        See `RedisStreamsTransport.publish` (stored, or raises) and
        `RedisPubSubTransport.publish` (at-most-once, never sent twice).
        """
        require_usable(self._state, self.backend)
        await self._modes[self.router.mode_of(topic)].publish(topic, event)

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Publish `(topic, event)` pairs pipelined, each in its topic's mode.

        The items are encoded first, then each mode's share is sent in order (see
        `RedisTransportBase.publish_many`); a bad item raises after the items before
        it were published, and none after it is.
        """
        require_usable(self._state, self.backend)
        shares: dict[Mode, list[Encoded]] = {}
        try:
            for topic, event in items:
                validate_topic(topic)
                mode = self.router.mode_of(topic)
                shares.setdefault(mode, []).append(self._modes[mode].encoded(topic, event))
        except LoomHAError:
            await self._send_shares(shares)
            raise
        await self._send_shares(shares)

    async def _send_shares(self, shares: dict[Mode, list[Encoded]]) -> None:
        for mode, share in shares.items():
            await self._modes[mode].send_encoded(share)

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Subscribe in every mode the pattern's topics may travel in.

        Returns once each mode confirmed its subscription (see the mode classes).

        Raises:
            UnsupportedCapabilityError: `group` was given and the pattern matches
                Pub/Sub topics (Pub/Sub has no competing consumers).
        """
        require_usable(self._state, self.backend)
        modes = self.router.modes_for(topic)
        if group is not None and "pubsub" in modes:
            raise UnsupportedCapabilityError(
                f"redis: {topic!r} matches Pub/Sub topics (mode {self.mode!r}, overrides "
                f"{self.router.patterns_in('pubsub', topic)}), which have no competing "
                "consumers (group=): subscribe with a pattern whose topics all use streams"
            )
        done: list[RedisTransportBase] = []
        try:
            for mode in modes:
                transport = self._modes[mode]
                await transport.subscribe(topic, handler, group=group)
                done.append(transport)
        except BaseException:
            for transport in done:
                await transport.unsubscribe(topic, handler)
            raise

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        """Drop the subscription in every mode; unknown pairs are ignored."""
        for transport in self._used:
            await transport.unsubscribe(topic, handler)

    @override
    async def ping(self) -> None:
        """PING the shared master once (see `RedisTransportBase.ping`)."""
        require_usable(self._state, self.backend)
        await self._used[0].ping()

    @override
    def statistics(self) -> TransportStatistics:
        """Counters summed over the modes; ``extra`` holds each mode's own figures."""
        parts = [t.statistics() for t in self._used]
        state = self._state
        connector = self._connector
        base = connector.reconnects if connector else 0
        sums = {
            f.name: sum(getattr(p, f.name) for p in parts)
            for f in fields(TransportStatistics)
            if f.name not in _OWN_FIELDS
        }
        return TransportStatistics(
            backend=self.backend,
            state=state,
            endpoint=connector.endpoint if connector else None,
            # each mode counts the shared master's reconnects; count them once
            reconnects=base + sum(p.reconnects - base for p in parts),
            extra={
                "mode": self.mode,
                "topic_modes": dict(self.router.topic_modes),
                **{m: p.extra or {} for m, p in zip(self.router.modes, parts, strict=True)},
            },
            **sums,
        )
