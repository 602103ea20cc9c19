"""The worker processes of `loom_ha.bench.discovery_scale`: a registering one and a watcher.

``python -m loom_ha.bench.discovery_workers register URL PREFIX COUNT OFFSET TTL`` or
``... watch URL SERVICE``. Each speaks JSON lines on stdout (``{"event": ...}``) and takes
one-word commands on stdin (``register``, ``measure``, ``stop``, ``close``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from loom_ha.bench.worker import commands, emit, wait_for
from loom_ha.discovery import ServiceInstance, open_registry

__all__ = ["PROBE", "SERVICES", "main"]

SERVICES = 10  # instances are spread over this many services (Loom node types)
PROBE = "probe"  # the instance the benchmark registers and deregisters in the watched service


def _request_kind(method: str, path: str) -> str:
    if path.startswith("/v1/agent/check/pass/loom-ha-heartbeat:"):
        return "process pass"
    if path.startswith("/v1/agent/check/"):
        return "status report"
    if path == "/v1/agent/services":
        return "reconcile"
    return f"{method} {path.split(':')[0]}"


async def _register_worker(url: str, prefix: str, count: int, offset: int, ttl: float) -> None:
    sent: Counter[str] = Counter()
    options: dict[str, Any] = {}
    if url.startswith("consul"):
        import aiohttp

        async def on_request(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
            sent[_request_kind(params.method, params.url.path)] += 1

        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(on_request)
        options["trace_configs"] = [trace]
    inbox = await commands()
    registry = open_registry(url, ttl=ttl, **options)
    try:
        emit("started")
        if not await wait_for(inbox, "register"):
            return
        instances = [
            ServiceInstance(
                service=f"{prefix}-s{n % SERVICES}",
                instance_id=f"i{n:05d}",
                address=f"redis://10.0.{n // 250}.{n % 250}:6379",
                meta={"version": "1.0.0", "transport": "redis"},
            )
            for n in range(offset, offset + count)
        ]
        await asyncio.gather(*(registry.register(i) for i in instances))
        emit("registered")
        if not await wait_for(inbox, "measure"):
            return
        before, stats, cpu = Counter(sent), registry.statistics(), time.process_time()
        if not await wait_for(inbox, "stop"):
            return
        after = registry.statistics()
        requests = dict(sent - before)
        if not url.startswith("consul"):
            requests = {"pipelines": after.heartbeat_rounds - stats.heartbeat_rounds}
        emit(
            "report",
            requests=requests,
            failures=after.heartbeat_failures,
            cpu=time.process_time() - cpu,
        )
    finally:
        began = time.perf_counter()
        await registry.close()
        emit("closed", seconds=time.perf_counter() - began)


async def _watch_worker(url: str, service: str) -> None:
    inbox = await commands()
    seen: list[tuple[float, bool]] = []
    ready = asyncio.Event()
    async with open_registry(url) as registry:

        async def follow() -> None:
            async for snap in registry.watch(service):
                present = PROBE in snap.ids
                if not seen or seen[-1][1] != present:
                    seen.append((time.time(), present))
                ready.set()

        follower = asyncio.create_task(follow())
        try:
            await ready.wait()
            emit("ready")
            cpu = time.process_time()
            if await wait_for(inbox, "stop"):
                emit("report", seen=seen, cpu=time.process_time() - cpu)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker: ``register URL PREFIX COUNT OFFSET TTL`` or ``watch URL SERVICE``."""
    kind, *rest = sys.argv[1:] if argv is None else argv
    if kind == "register":
        url, prefix, count, offset, ttl = rest
        asyncio.run(_register_worker(url, prefix, int(count), int(offset), float(ttl)))
    elif kind == "watch":
        url, service = rest
        asyncio.run(_watch_worker(url, service))
    else:
        raise SystemExit(f"unknown worker {kind!r}: register or watch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
