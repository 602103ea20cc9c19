"""RedisStreamsTransport: Loom topics over Redis Streams (at-least-once, durable).

One stream per exact topic (``<stream_prefix><topic>``), appended with XADD and an
approximate MAXLEN; every stream key is also recorded in a registry set so
wildcard subscribers can find streams. Each subscription key runs one consumer
(`loom_ha.redis._consumer`): fan-out keys read with XREAD from the moment they
subscribed, group keys share a consumer group, ack after the handler succeeded,
retry with backoff, reclaim what dead members left, and dead-letter at the end.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from loom_ha._handlers import Handler, SubscriptionKey
from loom_ha._tasks import finish_all
from loom_ha.errors import ConfigurationError, ConnectionLostError
from loom_ha.policy import DeliveryPolicy
from loom_ha.redis._base import Encoded, RedisTransportBase
from loom_ha.redis._consumer import StreamConsumer
from loom_ha.redis.pubsub import unwire, wire
from loom_ha.transport import Capabilities, require_usable

# Publishers re-add a stream to the registry this often (it may have been lost).
REGISTER_EVERY = 10.0

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream key, entry fields)


class RedisStreamsTransport(RedisTransportBase):
    """Loom topics over Redis Streams: durable, at-least-once, with competing consumers.

    `publish()` returns once the event is stored (see `RedisTransportBase.publish`);
    `publish_many()` pipelines many XADDs per round trip.

    Args:
        url: ``redis://``, ``rediss://`` or ``redis+sentinel://`` (see `loom_ha.redis.url`).
        stream_prefix: stream key of topic T is ``stream_prefix + T``.
        registry_key: the set of every stream key published to (for wildcards).
        maxlen: approximate length cap of each stream (XADD MAXLEN ~).
        policy: handler attempts and backoff before an event is dead-lettered.
        claim_idle: seconds an entry may stay unacknowledged by a group member
            before another member reclaims it (XAUTOCLAIM); keep it above your
            slowest handler plus `policy.backoff_max`.
        claim_interval: seconds between reclaim sweeps (default: claim_idle / 2, at most 5).
        block: longest wait of one XREAD/XREADGROUP, seconds (never 0: dapr #852).
        batch: entries read per call.
        discovery_interval: how often wildcard consumers re-read the registry.
        wait_replicas: replicas that must have an event before `publish()` returns
            (Redis WAIT); default 1 with Sentinel, 0 otherwise.
        wait_timeout: seconds WAIT may take before the publish is retried (default 1 s,
            or half of `socket_timeout` if less: it must stay below `socket_timeout`,
            which bounds the whole reply).
        consumer_name: this process's name inside consumer groups.
        **options: connection and codec options shared with `RedisPubSubTransport`.
    """

    backend = "redis-streams"
    capabilities = Capabilities(
        persistent=True,
        ordered=True,
        at_least_once=True,
        competing_consumers=True,
        replays_history=False,
        native_wildcards=False,
        dedup=False,
        cross_instance=True,
    )

    def __init__(
        self,
        url: str | None = None,
        *,
        stream_prefix: str = "loom:stream:",
        registry_key: str = "loom:streams",
        maxlen: int = 100_000,
        policy: DeliveryPolicy | None = None,
        claim_idle: float = 30.0,
        claim_interval: float | None = None,
        block: float = 1.0,
        batch: int = 100,
        discovery_interval: float = 1.0,
        wait_replicas: int | None = None,
        wait_timeout: float | None = None,
        consumer_name: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(url, **options)
        if maxlen < 1 or batch < 1:
            raise ConfigurationError("redis-streams: maxlen and batch must be >= 1")
        for name, value in (
            ("claim_idle", claim_idle),
            ("block", block),
            ("discovery_interval", discovery_interval),
        ):
            if value <= 0:
                raise ConfigurationError(f"redis-streams: {name} must be > 0, got {value}")
        if not stream_prefix or not registry_key:
            raise ConfigurationError("redis-streams: stream_prefix and registry_key are needed")
        self.stream_prefix = wire(stream_prefix)
        self.registry_key = registry_key
        self.maxlen = maxlen
        self.policy = policy or DeliveryPolicy()
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval or min(5.0, claim_idle / 2)
        self.block = block
        self.batch = batch
        self.discovery_interval = discovery_interval
        if wait_replicas is None:
            wait_replicas = 1 if self.settings.sentinel else 0
        if wait_replicas < 0:
            raise ConfigurationError(f"redis-streams: wait_replicas {wait_replicas} is < 0")
        if wait_timeout is None:
            wait_timeout = min(1.0, self.settings.socket_timeout / 2)
        if wait_timeout <= 0:
            raise ConfigurationError(f"redis-streams: wait_timeout must be > 0, got {wait_timeout}")
        if wait_replicas and wait_timeout >= self.settings.socket_timeout:
            # The reply of XADD + WAIT may take wait_timeout: a socket_timeout no longer
            # than that would call a healthy master with a slow replica dead.
            raise ConfigurationError(
                f"redis-streams: wait_timeout ({wait_timeout}s) must be below socket_timeout "
                f"({self.settings.socket_timeout}s) when wait_replicas is {wait_replicas}"
            )
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self.consumer_name = consumer_name or (
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self._consumers: dict[SubscriptionKey, StreamConsumer] = {}
        self._registered: dict[bytes, float] = {}
        self._registered_generation = 0
        self._known: tuple[float, list[bytes]] = (0.0, [])
        self.groups_recreated = 0
        self.trimmed = 0
        self.resent = 0

    # -- naming ----------------------------------------------------------------------------------

    def stream_key(self, topic: str) -> bytes:
        """The stream holding events of `topic`."""
        return self.stream_prefix + wire(topic)

    def topic_of(self, stream: bytes) -> str:
        """The topic a stream key belongs to."""
        return unwire(stream[len(self.stream_prefix) :])

    async def known_streams(self, *, fresh: bool = False) -> list[bytes]:
        """Every stream key in the registry (cached for `discovery_interval` unless `fresh`)."""
        fetched_at, keys = self._known
        if not fresh and time.monotonic() - fetched_at < self.discovery_interval:
            return keys
        registry = self.registry_key

        async def members(client: Any) -> Any:
            return await client.smembers(registry)

        found = await self.connector.run(members, policy=self.publish_policy, what="SMEMBERS")
        keys = sorted(k for k in found if k.startswith(self.stream_prefix))
        self._known = (time.monotonic(), keys)
        return keys

    @property
    @override
    def longest_block(self) -> float:
        """`block`: a blocked read may take it plus `socket_timeout` before it is given up."""
        return self.block

    # -- lifecycle -------------------------------------------------------------------------------

    @override
    async def _stop_mode(self) -> None:
        self._consumers.clear()  # their tasks are cancelled by local.close()
        self._registered.clear()
        self._known = (0.0, [])

    # -- Transport -------------------------------------------------------------------------------

    @override
    async def _send(self, batch: Sequence[Encoded]) -> None:
        """XADD the batch; returns once Redis (and `wait_replicas` replicas) have it.

        While the master is away the append is retried (a retry may duplicate an
        event whose reply was lost: consumers deduplicate on ``source`` + ``id``).
        """
        entries = [(self.stream_key(topic), {b"event": payload}) for topic, payload in batch]
        what = self._describe("XADD", batch)
        await self.append(entries, what=what)
        self.local.counters.published += len(batch)

    async def append(self, entries: Sequence[Entry], *, what: str) -> None:
        """XADD `(stream, fields)` entries (plus registry SADD and WAIT) in one round trip.

        A retry after the entries may already be stored (no reply, or too few replicas
        confirmed them) appends them again: at-least-once. Each re-sent entry is counted
        in ``statistics().extra["resent"]`` (an upper bound of the duplicates written).
        """
        now = time.monotonic()
        if self._registered_generation != self.connector.generation:
            # A new master (or a restarted server) may have lost the registry: re-add.
            self._registered.clear()
            self._registered_generation = self.connector.generation
        commands: list[Sequence[Any]] = []
        register: set[bytes] = set()
        for stream, fields in entries:
            xadd: list[Any] = [b"XADD", stream, b"MAXLEN", b"~", self.maxlen, b"*"]
            for name, value in fields.items():
                xadd += (name, value)
            commands.append(xadd)
            if now - self._registered.get(stream, -1e9) > REGISTER_EVERY:
                register.add(stream)
        if register:
            commands.append((b"SADD", self.registry_key, *register))
        replicas = self.wait_replicas
        wait_ms = int(self.wait_timeout * 1000)
        if replicas:
            commands.append((b"WAIT", replicas, wait_ms))

        def enough_replicas(replies: list[Any]) -> None:
            if replicas and int(replies[-1]) < replicas:
                raise ConnectionLostError(
                    f"only {replies[-1]} of {replicas} replicas confirmed within {wait_ms} ms"
                )

        def count_resend() -> None:
            self.resent += len(entries)

        await self.connector.execute(
            commands,
            policy=self.publish_policy,
            what=what,
            resend=True,
            check=enough_replicas,
            on_resend=count_resend,
        )
        for stream in register:
            self._registered[stream] = now

    @override
    async def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> None:
        """Subscribe; returns once the start position (or consumer group) is fixed in Redis.

        Fan-out subscribers see events published after this call returns; a group
        created now starts at the stream's end, an existing one keeps its position.
        """
        require_usable(self._state, self.backend)
        group = self.local.resolve_group(topic, group)
        key, _ = self.local.add(topic, handler, group)
        consumer = self._consumers.get(key)
        if consumer is None:
            consumer = self._consumers[key] = StreamConsumer(self, key)
        try:
            await consumer.ready()
        except BaseException:
            await self.unsubscribe(topic, handler)
            raise

    @override
    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        """Stop delivering; pending group entries of this member are reclaimed by others.

        Each reader is stopped to its end in a task of its own: called from the clean-up of
        a cancelled task (LoomApp's reply handler), the caller still counts as cancelling,
        which the redis calls of the stop would take for a cancellation of their own.
        """
        for key in await self.local.remove(topic, handler):
            consumer = self._consumers.pop(key, None)
            if consumer is not None:
                await finish_all(consumer.stop, owner=self.backend)

    @override
    def _extra(self) -> dict[str, Any]:
        return {
            "consumers": len(self._consumers),
            "groups_recreated": self.groups_recreated,
            "trimmed": self.trimmed,
            "resent": self.resent,
            "in_flight": sum(c.in_flight for c in self._consumers.values()),
            "consumer_name": self.consumer_name,
        }
