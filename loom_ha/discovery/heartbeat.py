"""`Heartbeat`: one loop that keeps alive every registration of a registry sharing a TTL.

A round asks the liveness probes first (concurrently, each bounded by the probe timeout),
then makes one backend call for the whole group (`_pulse_all`: Consul passes one
process-level TTL check that every instance's alias check follows; Redis pipelines one
``SET`` per instance), then registers again whatever the backend forgot. Rounds keep a
fixed schedule (one per `interval` from the first), so a slow probe or backend delays one
beat, never the ones after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from loom_ha.discovery.instance import ServiceInstance
from loom_ha.discovery.probe import evaluate
from loom_ha.discovery.registration import Registration
from loom_ha.errors import RegistryError
from loom_ha.retry import backoff_delay

__all__ = ["FAN_OUT", "REPORTS_PER_ROUND", "Heartbeat", "HeartbeatHost", "fan_out"]

log = logging.getLogger("loom_ha.discovery")

T = TypeVar("T")
X = TypeVar("X")

# Most backend calls one registry makes at once when it must touch many instances
# (registering forgotten ones again, deregistering on close): enough to hide round trips,
# few enough to stay far below Consul's per-client connection limit.
FAN_OUT = 16
# Most changes of health one round reports (where a backend reports them one call each):
# a round stays well inside its deadline even when every probe of a process failed at once;
# the rest follow in the next rounds.
REPORTS_PER_ROUND = 100


class HeartbeatHost(Protocol):
    """What a `Heartbeat` needs of its registry (`ServiceRegistry` provides it)."""

    backend: str
    timeout: float

    async def _call(self, operation: Awaitable[T], limit: float, *, queued: bool = True) -> T: ...
    async def _put(self, instance: ServiceInstance, ttl: float) -> None: ...
    async def _pulse(self, instance: ServiceInstance, ttl: float) -> bool: ...
    async def _pulse_all(
        self,
        instances: Sequence[ServiceInstance],
        changed: Sequence[ServiceInstance],
        ttl: float,
    ) -> list[ServiceInstance]: ...


async def fan_out(
    items: Iterable[X], action: Callable[[X], Awaitable[object]], *, limit: int = FAN_OUT
) -> list[tuple[X, RegistryError]]:
    """Run `action` on every item, at most `limit` at once; return the items that failed.

    Only `RegistryError`s are collected; anything else (a bug, a cancellation) propagates.
    """
    gate = asyncio.Semaphore(limit)
    failed: list[tuple[X, RegistryError]] = []

    async def one(item: X) -> None:
        async with gate:
            try:
                await action(item)
            except RegistryError as exc:
                failed.append((item, exc))

    async with asyncio.TaskGroup() as group:
        for item in items:
            group.create_task(one(item))
    return failed


class Heartbeat:
    """Keeps alive the registrations of one registry that share (ttl, interval).

    `run()` is the loop (owned by the registry's task supervisor). Rounds, reports
    (`set_health`) and deregistrations are serialized by one lock, so a round never
    overwrites a newer report with the health it read before it.
    """

    def __init__(
        self, host: HeartbeatHost, *, ttl: float, interval: float, probe_timeout: float
    ) -> None:
        self.ttl = ttl
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.members: dict[tuple[str, str], Registration] = {}
        self.beats = 0  # instance heartbeats confirmed by the backend
        self.failures = 0  # instance heartbeats that failed
        self.reregistrations = 0
        self.rounds = 0  # successful rounds (one backend call each, whatever the members)
        self._host = host
        self._lock = asyncio.Lock()

    @property
    def limit(self) -> float:
        """Deadline of one backend call: the registry's timeout, never more than the TTL."""
        return min(self._host.timeout, self.ttl)

    async def join(self, registration: Registration) -> None:
        """Create the instance at the backend (passing), then keep it alive with the group."""
        sent = registration.current()
        await self._host._call(self._host._put(sent, self.ttl), self.limit)
        registration._confirmed(sent)
        self.beats += 1
        self.members[registration.key] = registration

    def leave(self, registration: Registration) -> None:
        """Stop beating for `registration` (from the next round on)."""
        self.members.pop(registration.key, None)

    async def settle(self) -> None:
        """Wait for a round or report in flight to finish."""
        async with self._lock:
            pass

    async def report(self, registration: Registration) -> None:
        """Tell the backend `registration`'s health now (one call), outside the rounds."""
        async with self._lock:
            if not registration.active:
                return
            sent = registration.current()
            host = self._host
            try:
                if not await host._call(host._pulse(sent, self.ttl), self.limit):
                    log.warning(
                        "%r unknown to %s: registering it again", registration, host.backend
                    )
                    await host._call(host._put(sent, self.ttl), self.limit)
                    registration.reregistrations += 1
                    self.reregistrations += 1
            except RegistryError as exc:
                registration._failed(str(exc))
                self.failures += 1
                raise
            registration._confirmed(sent)
            self.beats += 1

    async def run(self) -> None:
        """Beat every `interval` until cancelled; after a failed round retry sooner."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval  # the group's first instance was just registered
        failures = 0
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                await self.beat()
            except RegistryError as exc:
                # Sooner than the period, so one lost round does not cost the TTL.
                failures += 1
                delay = backoff_delay(failures, initial=self.interval / 4, cap=self.interval)
                log.warning(
                    "heartbeat of %d instance(s) (ttl %gs) failed (%s); retrying in %.2fs",
                    len(self.members),
                    self.ttl,
                    exc,
                    delay,
                )
                due = loop.time() + delay
                continue
            failures = 0
            due += self.interval
            if due < loop.time():  # fell behind (slow backend): the beat just went out
                due = loop.time() + self.interval

    async def beat(self) -> None:
        """One round: probes, one backend call for every member, re-register the forgotten.

        Raises:
            RegistryError: the backend call failed (every member counts a failure).
        """
        probed = [(r, r.probe) for r in self.members.values() if r.active and r.probe is not None]
        if probed:
            verdicts = await asyncio.gather(
                *(evaluate(probe, self.probe_timeout, what="liveness probe") for _, probe in probed)
            )
            for (registration, _), (alive, why) in zip(probed, verdicts, strict=True):
                if registration._verdict is None and not alive:
                    log.warning("%r is not answering: %s", registration, why)
                registration._verdict = None if alive else why
        async with self._lock:
            members = [r for r in self.members.values() if r.active]
            now = time.time()
            sent = [r.current(now) for r in members]
            changed = [
                (r, i) for r, i in zip(members, sent, strict=True) if r._reported != _state(i)
            ]
            later = {r.key for r, _ in changed[REPORTS_PER_ROUND:]}
            reporting = [i for _, i in changed[:REPORTS_PER_ROUND]]
            host = self._host
            try:
                forgotten = await host._call(
                    host._pulse_all(sent, reporting, self.ttl), self.limit, queued=False
                )
            except RegistryError as exc:
                self._fail(members, exc)
                raise
            self.rounds += 1
            lost = {(i.service, i.instance_id) for i in forgotten}
            kept = [(r, i) for r, i in zip(members, sent, strict=True) if r.key not in lost]
            for registration, instance in kept:
                registration._confirmed(instance, reported=registration.key not in later)
            self.beats += len(kept)
            if lost:
                await self._register_again(
                    [(r, i) for r, i in zip(members, sent, strict=True) if r.key in lost]
                )

    async def _register_again(self, pairs: list[tuple[Registration, ServiceInstance]]) -> None:
        host = self._host
        log.warning(
            "%d instance(s) unknown to %s: registering them again", len(pairs), host.backend
        )

        async def put(pair: tuple[Registration, ServiceInstance]) -> None:
            await host._call(host._put(pair[1], self.ttl), self.limit)

        failed = await fan_out(pairs, put)
        failed_keys = {pair[0].key for pair, _ in failed}
        for registration, instance in pairs:
            if registration.key not in failed_keys:
                registration._confirmed(instance)
                registration.reregistrations += 1
                self.reregistrations += 1
                self.beats += 1
        if failed:
            self._fail([pair[0] for pair, _ in failed], failed[0][1])
            raise failed[0][1]

    def _fail(self, registrations: list[Registration], exc: RegistryError) -> None:
        for registration in registrations:
            registration._failed(str(exc))
        self.failures += len(registrations)


def _state(instance: ServiceInstance) -> tuple[object, str]:
    return instance.health, instance.note
