"""What the HA layer costs: HATransport over a backend beside the same backend bare."""

from __future__ import annotations

from collections.abc import Callable

from loom_ha.bench.core import BenchRow, compare, compared_row, throughput_of
from loom_ha.bench.memory import loom_event_factory
from loom_ha.ha import HATransport
from loom_ha.transport import Transport


async def ha_row(
    name: str, bare: Callable[[], Transport], events: int, rounds: int = 5
) -> BenchRow:
    """Throughput through `HATransport(bare())` beside `bare()` alone (dedup on, as by default),
    in `rounds` alternating rounds."""
    make_event = loom_event_factory()
    results = await compare(
        throughput_of(lambda: HATransport(bare()), make_event, events),
        throughput_of(bare, make_event, events),
        rounds,
    )
    return compared_row(f"{name} throughput via HATransport", "events/s", results, f"bare {name}")


async def ha_rows(
    events: int,
    *,
    redis_url: str | None = None,
    nats_servers: list[str] | None = None,
    rounds: int = 5,
) -> list[BenchRow]:
    """HA-layer rows for the embedded default and, when given, Redis and NATS."""
    from loom_ha.memory import InMemoryTransport

    rows = [await ha_row("memory", InMemoryTransport, events, rounds)]
    bare: list[tuple[str, Callable[[], Transport], int]] = []
    if redis_url is not None:
        from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport

        bare.append(("redis pubsub", lambda: RedisPubSubTransport(redis_url), events))
        bare.append(("redis streams", lambda: RedisStreamsTransport(redis_url), events // 4))
    if nats_servers is not None:
        from loom_ha.nats import JetStreamTransport, NatsCoreTransport

        bare.append(("nats core", lambda: NatsCoreTransport(nats_servers), events))
        bare.append(("nats jetstream", lambda: JetStreamTransport(nats_servers), events // 4))
    for name, make, count in bare:
        rows.append(await ha_row(name, make, count, rounds))
    return rows
