"""The Transport contract every backend implements, and what it declares about itself.

A transport moves CloudEvents between processes on string topics (see
`loom_ha.topics` for the grammar). It is a drop-in for loom-agent 0.3.4's
``loom.interfaces.transport.Transport``: LoomApp calls `connect()` before every
publish and subscribe and `unsubscribe()` after every node-to-node call.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Self, TypeAlias

from loom_ha._handlers import Handler
from loom_ha.errors import ConnectionLostError, NotConnectedError, TransportClosedError

__all__ = [
    "Capabilities",
    "GroupRule",
    "Handler",
    "Transport",
    "TransportState",
    "TransportStatistics",
    "loom_request_groups",
]

GroupRule: TypeAlias = Callable[[str], str | None]
"""Maps a subscription pattern to the group it joins when the caller gave none."""

LOOM_REQUEST_PREFIX = "node.request/"


def loom_request_groups(pattern: str) -> str | None:
    """Default group rule: each ``node.request/<node>`` topic is its own group.

    So a request reaches one instance of a node (competing consumers), while
    responses, errors, stream chunks and state patches fan out to everyone.
    Wildcard subscriptions (``node.request/*``, used by observers) stay fan-out.
    """
    if pattern.startswith(LOOM_REQUEST_PREFIX) and "*" not in pattern:
        return pattern
    return None


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a backend guarantees; read by users and by the conformance suite."""

    persistent: bool  # events survive the absence of subscribers / a broker restart
    ordered: bool  # one publisher, one topic, one subscriber: publish order is kept
    at_least_once: bool  # redelivery after failures: duplicates possible
    competing_consumers: bool  # `group=` gives each event to one member
    replays_history: bool  # a new subscriber sees events published before it
    native_wildcards: bool  # the broker filters wildcards (else filtered client side)
    dedup: bool  # the broker drops a re-published event id within a window
    cross_instance: bool  # two processes (or two transport objects) can talk

    def names(self) -> list[str]:
        """Names of the capabilities this backend has."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


class TransportState(enum.Enum):
    """Lifecycle of a transport; HATransport adds `RECONNECTING` transitions."""

    NEW = "new"  # constructed, never connected
    CONNECTING = "connecting"  # first connection in progress
    CONNECTED = "connected"  # publish and subscribe work
    RECONNECTING = "reconnecting"  # broker lost; subscriptions will be restored
    DISCONNECTED = "disconnected"  # disconnect() finished; connect() may be called again
    CLOSED = "closed"  # closed for good; never reconnects


StateListener: TypeAlias = Callable[[TransportState], None]
"""Told every new state of a transport (called in the event loop; must not block)."""


@dataclass(frozen=True, kw_only=True)
class TransportStatistics:
    """A snapshot of a transport's counters and state (anyio-style `statistics()`)."""

    backend: str
    state: TransportState
    endpoint: str | None = None
    subscriptions: int = 0
    handlers: int = 0
    queued: int = 0
    published: int = 0
    delivered: int = 0
    handler_errors: int = 0
    filtered: int = 0
    malformed: int = 0
    dead_lettered: int = 0
    redelivered: int = 0
    reconnects: int = 0
    duplicates_dropped: int = 0
    outbox_depth: int = 0
    outbox_dropped: int = 0
    extra: dict[str, Any] | None = None


class Transport(ABC):
    """Publish and subscribe CloudEvents on topics.

    Contract (held by `loom_ha.testing.conformance` for every backend):

    * `connect()` is idempotent and cheap once connected; `disconnect()` is
      idempotent and leaves no task or socket behind, even when cancelled.
    * `publish()` / `subscribe()` before `connect()` raise `NotConnectedError`.
    * `subscribe()` returns only once the broker confirmed the subscription, so an
      event published right after it is delivered.
    * `group=` makes subscribers with the same pattern and group compete: each
      event goes to one of them. Without a group, every subscriber gets it.
    * A handler on overlapping patterns gets each event once; handler exceptions
      are logged and counted and never stop delivery.
    * `unsubscribe()` of an unknown handler is a no-op.
    """

    capabilities: Capabilities  # a class attribute; HATransport sets it per instance

    @abstractmethod
    async def connect(self) -> None:
        """Connect to the broker (idempotent: a no-op when already connected)."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Stop every listener, drop every subscription and close every socket.

        Idempotent, safe at any moment, and the transport may be connected again.
        """

    @abstractmethod
    async def publish(self, topic: str, event: Any) -> None:
        """Send `event` (a CloudEvent) on `topic`.

        Raises:
            NotConnectedError: not connected.
            ConfigurationError: `topic` is empty or contains ``*``.
        """

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Publish `(topic, event)` pairs in order, each with `publish()`'s promise.

        Backends that can pipeline (Redis, JetStream) send many per round trip; this
        default publishes one after another. Either way a bad item raises after
        every item before it was published, and none after it is.
        """
        for topic, event in items:
            await self.publish(topic, event)

    @abstractmethod
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Deliver events whose topic matches the pattern `topic` to `handler`.

        Raises:
            NotConnectedError: not connected.
            ConfigurationError: `topic` is not a valid pattern.
        """

    @abstractmethod
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        """Stop delivering `topic` to `handler`; unknown pairs are ignored."""

    @abstractmethod
    def statistics(self) -> TransportStatistics:
        """Current state and counters."""

    async def ping(self) -> None:
        """A round trip to the broker, to learn whether it answers.

        Backends override it with a real round trip (Redis PING, a NATS flush); it
        also makes a lazily reconnecting client reconnect. The default checks the
        state only.

        Raises:
            ConnectionLostError: the broker does not answer (a transient error).
        """
        state = self.statistics().state
        if state is not TransportState.CONNECTED:
            raise ConnectionLostError(f"{self.statistics().backend} transport is {state.value}")

    def add_state_listener(self, listener: StateListener) -> Callable[[], None] | None:
        """Call `listener(new_state)` on every state change; returns a function that removes it.

        Every loom-ha backend announces its changes (a `loom_ha.backend.StateCell`), so the
        layers above react at once instead of polling `statistics()`. This default returns
        None: "this transport does not announce", and `HATransport` then polls its state.
        """
        return None

    def resolve_group(self, pattern: str, group: str | None) -> str | None:
        """The group a subscription to `pattern` joins: `group`, else the backend's group rule
        (Loom's ``node.request/<node>``); None means fan-out (every subscriber gets each event).

        Layers above a backend (HATransport's dedup) ask it, so they never treat competing
        deliveries as fan-out or the other way round. Backends without competing consumers
        return None.
        """
        return group if self.capabilities.competing_consumers else None

    async def close(self) -> None:
        """`disconnect()` for good: the state becomes CLOSED and a later `connect()` raises
        `TransportClosedError`. Idempotent, safe at any moment (before or during `connect()`
        too). LoomApp never disconnects, so owners close.
        """
        try:
            await self.disconnect()
        finally:
            self._mark_closed()

    def _mark_closed(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Record the CLOSED state (`close()` calls it after disconnecting); backends that
        keep their own state override it."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()


def require_usable(state: TransportState, backend: str) -> None:
    """`require_connected`, but RECONNECTING passes too: for calls that wait for the broker
    or are buffered while the client library reconnects."""
    if state is not TransportState.RECONNECTING:
        require_connected(state, backend)


def require_connected(state: TransportState, backend: str) -> None:
    """Raise the error that explains why `state` does not allow I/O."""
    if state is TransportState.CONNECTED:
        return
    if state is TransportState.CLOSED:
        raise TransportClosedError(f"{backend} transport is closed")
    raise NotConnectedError(
        f"{backend} transport is not connected (state: {state.value}): "
        "await transport.connect() first"
    )
