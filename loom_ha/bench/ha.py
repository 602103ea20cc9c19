"""What the HA layer costs: HATransport over a backend beside the same backend bare."""

from __future__ import annotations

from collections.abc import Callable

from loom_ha.bench.core import BenchRow, measure_throughput
from loom_ha.bench.memory import loom_event_factory
from loom_ha.ha import HATransport
from loom_ha.transport import Transport


async def ha_row(name: str, bare: Callable[[], Transport], events: int) -> BenchRow:
    """Throughput through `HATransport(bare())` beside `bare()` alone (dedup on, as by default).

    Each side is measured twice, alternating, and the better run kept, so a noisy
    neighbour on the machine does not decide the ratio.
    """
    make_event = loom_event_factory()
    ours: list[float] = []
    base: list[float] = []
    for _ in range(2):
        base.append(await measure_throughput(bare, make_event, events))
        ours.append(await measure_throughput(lambda: HATransport(bare()), make_event, events))
    return BenchRow(
        f"{name} throughput via HATransport", "events/s", max(ours), max(base), f"bare {name}"
    )


async def ha_rows(
    events: int, *, redis_url: str | None = None, nats_servers: list[str] | None = None
) -> list[BenchRow]:
    """HA-layer rows for the embedded default and, when given, Redis and NATS."""
    from loom_ha.memory import InMemoryTransport

    rows = [await ha_row("memory", InMemoryTransport, events)]
    if redis_url is not None:
        from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport

        rows.append(await ha_row("redis pubsub", lambda: RedisPubSubTransport(redis_url), events))
        rows.append(
            await ha_row("redis streams", lambda: RedisStreamsTransport(redis_url), events // 4)
        )
    if nats_servers is not None:
        from loom_ha.nats import JetStreamTransport, NatsCoreTransport

        rows.append(await ha_row("nats core", lambda: NatsCoreTransport(nats_servers), events))
        rows.append(
            await ha_row("nats jetstream", lambda: JetStreamTransport(nats_servers), events // 4)
        )
    return rows
