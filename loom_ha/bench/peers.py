"""Peer rows of `loom-ha bench`: FastStream doing the same work as loom-ha's default path.

loom-ha's side is what an application gets from `create_transport(url)` (what
`loom_transport(url)` hands LoomApp): `HATransport` with its default dedup window, NATS in
core mode, Redis in Pub/Sub mode, received events built as Loom's `CloudEvent` (ours when
loom-agent is not installed). Both sides move the same event from `loom_event_factory`, with
the publisher and the subscriber in this process, in alternating rounds (`compare`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from importlib import import_module
from importlib.metadata import version
from typing import Any

from loom_ha.bench.core import (
    LATENCY_P50,
    LATENCY_P99,
    THROUGHPUT,
    BenchRow,
    Figures,
    Measure,
    compare,
    compared_row,
    latency_of,
    throughput_of,
)
from loom_ha.bench.ha import default_path, with_options
from loom_ha.bench.memory import loom_event_factory
from loom_ha.errors import ConfigurationError
from loom_ha.spec import parse_transport_url

DEFAULT_MODE = {"nats": "core", "redis": "pubsub"}
"""The mode of loom-ha's side per transport: the at-most-once peers of FastStream's."""

WAIT_TIMEOUT = 120.0
"""Seconds one round may wait for its last event or reply, as `measure_throughput` does."""

PING_TIMEOUT = 10.0
"""Seconds one request may wait for its reply, as `measure_latency` waits for a pong."""

LIVE_TIMEOUT = 10.0
"""Seconds to wait until a new FastStream subscriber receives (see `_until_live`)."""

_PROBE = -1  # data["n"] of the probes `_until_live` sends: never counted


async def peer_rows(
    transport: str, url: str, events: int, pings: int, rounds: int
) -> list[BenchRow]:
    """loom-ha's default path beside FastStream on one broker, in `rounds` alternating rounds.

    Rows: publish-each throughput with one subscriber in this process (events/s), then
    request/reply latency p50 and p99 (ms): loom-ha's ping-pong as `latency_of` measures
    it beside FastStream's own `broker.request`.

    Args:
        transport: ``"nats"`` or ``"redis"``.
        url: a running server's address without options (``nats://h:4222``, several
            comma-separated, ``tls://``; ``redis://h:6379/0``, ``rediss://``): the
            default path's mode is set here.
        events: events per throughput round; pings: round trips per latency round.
        rounds: rounds per row; each side runs once per round.

    Raises:
        ImportError: the `bench` extra (FastStream) is not installed.
        ConfigurationError: `transport` is not nats/redis, or `url` is not a plain
            address of that broker.
    """
    if transport not in DEFAULT_MODE:
        raise ConfigurationError(f"peer rows: transport {transport!r} is not 'nats' or 'redis'")
    peer = f"FastStream {_faststream_version(transport)}"
    spec = parse_transport_url(url)
    if spec.broker != transport or spec.scheme == "redis+sentinel":
        raise ConfigurationError(
            f"peer rows: a {spec.scheme}:// URL is not a plain {transport} server address"
        )
    if "?" in url:
        raise ConfigurationError(
            "peer rows: give the server address without options "
            f"(the default path's mode={DEFAULT_MODE[transport]} is set here)"
        )

    from loom_ha.event import loom_event_class

    event_class = loom_event_class()
    make_event = loom_event_factory()
    ours = default_path(
        with_options(url, mode=DEFAULT_MODE[transport]), event_class=event_class
    ).default

    if transport == "nats":
        servers = list(spec.servers)
        target = "subject"

        def broker() -> Any:
            from faststream.nats import NatsBroker

            return NatsBroker(servers, logger=None)

        name, kind = "nats core", "NatsBroker"
    else:
        address = spec.address
        target = "channel"

        def broker() -> Any:
            from faststream.redis import RedisBroker

            # RedisBrokerParams types `logger` without None, but RedisBroker takes it as
            # NatsBroker does (faststream 0.7.8's make_logger_storage: None -> no logging).
            return RedisBroker(address, logger=None)  # type: ignore[arg-type]

        name, kind = "redis pubsub", "RedisBroker"

    peer_side = _FastStream(broker, target, event_class, make_event)
    results = await compare(
        throughput_of(ours, make_event, events), peer_side.throughput(events), rounds
    )
    rows = [
        compared_row(
            f"{name} throughput, publish each + subscriber (default path)",
            "events/s",
            results,
            f"{peer}: {kind}.publish each (awaited) + subscriber",
            **THROUGHPUT,
        )
    ]
    results = await compare(
        latency_of(ours, make_event, pings), peer_side.request_latency(pings), rounds
    )
    how = (
        "(loom-ha: publish ping, its handler publishes a pong to a pong handler; "
        "FastStream: broker.request, the handler returns the event)"
    )
    base = f"{peer}: {kind}.request + reply validated"
    for figure, options in (("p50", LATENCY_P50), ("p99", LATENCY_P99)):
        row_name = f"{name} request/reply {figure} {how}"
        rows.append(compared_row(row_name, "ms", results, base, **options))
    return rows


def _faststream_version(transport: str) -> str:
    """FastStream's version, once its broker for `transport` imports."""
    try:
        import_module(f"faststream.{transport}")
    except ImportError as exc:
        raise ImportError(
            f"the FastStream peer rows need FastStream ({exc}): pip install 'loom-ha[bench]'"
        ) from exc
    return version("faststream")


class _FastStream:
    """FastStream used as its documentation shows, one fresh broker per measurement.

    A subscriber is a decorated handler whose parameter is annotated with the event class,
    so FastStream validates each message into it; `broker.publish(event, ...)` is given the
    pydantic event itself and serializes it with its default JSON codec; the broker starts
    once its subscribers are declared and `stop()` closes its connections and tasks.
    FastStream's per-message INFO log is off (``logger=None``), as a production service
    would run it and so the bench does not print every event.
    """

    def __init__(
        self,
        make_broker: Callable[[], Any],
        target: str,
        event_class: type[Any],
        make_event: Callable[[int], Any],
    ) -> None:
        self._make_broker = make_broker
        self._target = target  # publish/request keyword: NATS "subject", Redis "channel"
        self._event_class = event_class
        self._make_event = make_event

    def _handler(self, fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        # The class is chosen at run time (Loom's when installed), so the annotation a
        # FastStream user writes in the source is set here; FastStream reads it to validate.
        fn.__annotations__ = {"event": self._event_class}
        return fn

    def _to(self, topic: str) -> dict[str, str]:
        return {self._target: topic.replace("/", ".") if self._target == "subject" else topic}

    def throughput(self, events: int) -> Measure:
        """Events/s from the first `broker.publish` until the subscriber got the last one, and
        this process's CPU µs per event over that window (as `measure_throughput`)."""

        async def measure() -> Figures:
            broker = self._make_broker()
            to = self._to("bench.peer/throughput")
            received = 0
            live, done = asyncio.Event(), asyncio.Event()

            async def count(event: Any) -> None:
                nonlocal received
                if event.data["n"] == _PROBE:
                    live.set()
                    return
                received += 1
                if received >= events:
                    done.set()

            broker.subscriber(**to)(self._handler(count))
            try:
                await broker.start()
                probe = self._make_event(_PROBE)
                await _until_live(lambda: broker.publish(probe, **to), live)
                batch = [self._make_event(i) for i in range(events)]
                cpu_started = time.process_time()
                started = time.perf_counter()
                for event in batch:
                    await broker.publish(event, **to)
                async with asyncio.timeout(WAIT_TIMEOUT):
                    await done.wait()
                elapsed = time.perf_counter() - started
                cpu = time.process_time() - cpu_started
                return events / elapsed, cpu / events * 1e6
            finally:
                await broker.stop()

        return measure

    def request_latency(self, pings: int) -> Measure:
        """p50 and p99 ms of `broker.request` answered by a handler that returns the event.

        The reply is validated into the event class, as loom-ha's pong handler receives one.
        """

        async def measure() -> Figures:
            broker = self._make_broker()
            to = self._to("bench.peer/ping")
            live = asyncio.Event()

            async def echo(event: Any) -> Any:
                live.set()
                return event

            broker.subscriber(**to)(self._handler(echo))
            samples: list[float] = []
            try:
                await broker.start()
                probe = self._make_event(_PROBE)
                await _until_live(lambda: broker.publish(probe, **to), live)
                validate = self._event_class.model_validate
                for i in range(pings):
                    event = self._make_event(i)
                    started = time.perf_counter()
                    reply = await broker.request(event, timeout=PING_TIMEOUT, **to)
                    validate(await reply.decode())
                    samples.append((time.perf_counter() - started) * 1000)
            finally:
                await broker.stop()
            samples.sort()  # the percentiles as `measure_latency` takes them
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            return samples[len(samples) // 2], p99

        return measure


async def _until_live(send: Callable[[], Awaitable[Any]], live: asyncio.Event) -> None:
    """Send probes until the subscriber got one.

    FastStream's Redis subscriber returns from `start()` before Redis confirmed SUBSCRIBE
    (loom-ha's `subscribe` waits for it), so a first event could be lost; NATS needs no
    wait but gets the same probe so both brokers are measured alike.
    """
    async with asyncio.timeout(LIVE_TIMEOUT):
        while not live.is_set():
            await send()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):  # a probe's round trip on loopback
                    await live.wait()
