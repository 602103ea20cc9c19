"""Where the default path's CPU per event goes, piece by piece (issue 14's profile).

The bench rows say how much loom-ha adds per event above the raw client; this says which
layer adds it. Each piece is timed against the same work without it, in one process, as
CPU time per event (median of alternating rounds):

* NATS core's receive path, without a broker: a handler called directly (what raw
  nats-py's callback does), through `invoke`, through `deliver_serially` (the per-handler
  mailbox), and through `HATransport`'s `DedupHandler` (key, claim, wrapper); the publish
  side as `HATransport.publish` over an in-memory transport.
* Redis Streams' consumer on a real server: a backlog drained by one group member, raw
  redis-py (XREADGROUP of 100 + XACK) beside the bare backend and the default path.

Run: ``python -m loom_ha.bench.path_profile [--events N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from loom_ha._delivery import LocalDelivery
from loom_ha._handlers import DeliveryCounters, invoke
from loom_ha.bench.memory import loom_event_factory
from loom_ha.config import create_transport
from loom_ha.event import EventCodec, loom_event_class
from loom_ha.ha.dedup import DedupHandler, MemoryDedup
from loom_ha.ha.failover import HATransport
from loom_ha.memory import InMemoryTransport

Pieces = dict[str, list[float]]

DIRECT = "handler called directly (raw nats-py's callback)"
INVOKE = "invoke(handler)"
MEMORY_PUBLISH = "in-memory publish, no subscriber"
CORE_OVER = {  # each piece of the NATS core path, and the piece it wraps
    INVOKE: DIRECT,
    "deliver_serially -> invoke(handler)": INVOKE,
    "invoke(DedupHandler(handler)), a fresh window": INVOKE,
    "HATransport.publish over it": MEMORY_PUBLISH,
}


async def _handler(event: Any) -> None:
    """The handler every piece calls: a coroutine that does nothing."""


async def _ns_per_event(events: Sequence[Any], call: Callable[[Any], Awaitable[Any]]) -> float:
    started = time.process_time()
    for event in events:
        await call(event)
    return (time.process_time() - started) / len(events) * 1e9


async def nats_core_pieces(events: int, rounds: int) -> Pieces:
    """CPU ns per event of each layer of the NATS core default path (no broker)."""
    task = asyncio.current_task()
    counters = DeliveryCounters()
    local = LocalDelivery("profile", None)
    key, _ = local.add("bench/x", _handler, None)
    inner = InMemoryTransport()
    ha = HATransport(InMemoryTransport(), dedup=False)
    await inner.connect()
    await ha.connect()
    make_event = loom_event_factory()
    pieces: Pieces = {}

    def through_invoke(handler: Any) -> Callable[[Any], Awaitable[Any]]:
        return lambda event: invoke(handler, "bench/x", event, counters, task)

    try:
        for _ in range(rounds):
            batch = [make_event(i) for i in range(events)]
            dedup = DedupHandler(_handler, MemoryDedup(), None, lambda: None)
            timed: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
                (DIRECT, _handler),
                (INVOKE, through_invoke(_handler)),
                (
                    "deliver_serially -> invoke(handler)",
                    lambda e: local.deliver_serially(key, "bench/x", e, task),  # type: ignore[arg-type]
                ),
                ("invoke(DedupHandler(handler)), a fresh window", through_invoke(dedup)),
                (MEMORY_PUBLISH, lambda e: inner.publish("bench/y", e)),
                ("HATransport.publish over it", lambda e: ha.publish("bench/y", e)),
            ]
            for name, call in timed:
                pieces.setdefault(name, []).append(await _ns_per_event(batch, call))
    finally:
        await ha.close()
        await inner.close()
    return pieces


async def _raw_drain(url: str, codec: EventCodec[Any], payloads: Sequence[bytes]) -> float:
    import redis.asyncio as aioredis

    stream = f"profile:{uuid.uuid4().hex}"
    client = aioredis.Redis.from_url(url, protocol=2)
    try:
        await client.xgroup_create(stream, "g", id="0", mkstream=True)
        await _append(client, stream, payloads)
        got, started = 0, time.process_time()
        while got < len(payloads):
            reply: Any = await client.xreadgroup("g", "c", {stream: ">"}, count=100, block=1000)
            for _, entries in reply or ():
                for _, fields in entries:
                    await _handler(codec.decode(fields[b"event"]))
                    got += 1
                await client.xack(stream, "g", *[entry_id for entry_id, _ in entries])
        return (time.process_time() - started) / len(payloads) * 1e6
    finally:
        await client.delete(stream)
        await client.aclose()


async def _loom_drain(url: str, event_class: Any, payloads: Sequence[bytes]) -> float:
    import redis.asyncio as aioredis

    topic = f"profile/{uuid.uuid4().hex[:8]}"
    transport = create_transport(url, event_class=event_class)
    client = aioredis.Redis.from_url(url.split("?")[0], protocol=2)
    await transport.connect()
    try:
        # The group exists at the stream's start: subscribing joins it and drains the backlog.
        backend: Any = getattr(transport, "_inner", transport)
        stream: bytes = backend.stream_key(topic)
        await client.xgroup_create(stream, "g", id="0", mkstream=True)
        await _append(client, stream, payloads)
        drained, got = asyncio.Event(), 0

        async def handler(event: Any) -> None:
            nonlocal got
            got += 1
            if got == len(payloads):
                drained.set()

        started = time.process_time()
        await transport.subscribe(topic, handler, group="g")
        await drained.wait()
        return (time.process_time() - started) / len(payloads) * 1e6
    finally:
        await transport.close()
        await client.delete(stream)
        await client.aclose()


async def _append(client: Any, stream: str | bytes, payloads: Sequence[bytes]) -> None:
    for start in range(0, len(payloads), 500):
        pipe = client.pipeline(transaction=False)
        for payload in payloads[start : start + 500]:
            pipe.xadd(stream, {"event": payload})
        await pipe.execute()


async def streams_drain(url: str, events: int, rounds: int) -> Pieces:
    """CPU µs per event draining a Redis Streams backlog: raw, bare backend, default path."""
    event_class = loom_event_class()
    codec: EventCodec[Any] = EventCodec(event_class)
    make_event = loom_event_factory()
    payloads = [codec.encode(make_event(i)) for i in range(events)]
    pieces: Pieces = {}
    for _ in range(rounds):
        pieces.setdefault("raw redis-py", []).append(await _raw_drain(url, codec, payloads))
        for name, options in (("bare backend", "&ha=false"), ("default path", "")):
            drain = await _loom_drain(f"{url}?mode=streams{options}", event_class, payloads)
            pieces.setdefault(name, []).append(drain)
    return pieces


def report(title: str, unit: str, pieces: Pieces, over: dict[str, str]) -> str:
    """One line per piece: its median [range], and what it adds over the piece it wraps."""
    lines = [title]
    digits = 1 if unit == "µs" else 0
    medians = {name: statistics.median(values) for name, values in pieces.items()}
    for name, values in pieces.items():
        spread = f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
        base = over.get(name)
        step = "" if base is None else f"  {medians[name] - medians[base]:+.{digits}f} over {base}"
        lines.append(f"  {medians[name]:8.{digits}f} {unit}  {spread}  {name}{step}")
    return "\n".join(lines)


async def main(events: int, rounds: int) -> None:
    from loom_ha.testing.redis_servers import RedisServer

    pieces = await nats_core_pieces(events, rounds)
    print(report("NATS core default path, CPU per event (no broker):", "ns", pieces, CORE_OVER))
    server = RedisServer().start()
    try:
        drain = await streams_drain(server.url, events // 5, rounds)
    finally:
        server.stop()
    over = {"bare backend": "raw redis-py", "default path": "bare backend"}
    print(report("Redis Streams, draining a backlog as one group member:", "µs", drain, over))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.events, arguments.rounds))
