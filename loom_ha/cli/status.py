"""`loom-ha status`: a table of the services, instances, health and heartbeats in a registry."""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from loom_ha._redact import redact
from loom_ha.discovery import Health, ServiceInstance, open_registry
from loom_ha.errors import ConfigurationError, RegistryError

__all__ = ["render_status", "run_status"]

_STYLE = {Health.PASSING: "green", Health.WARNING: "yellow", Health.CRITICAL: "bold red"}


def _default_consul_url() -> str:
    from loom_ha.discovery.consul import parse_consul_address

    scheme, host, port = parse_consul_address()
    return f"{'consul+https' if scheme == 'https' else 'consul'}://{host}:{port}"


def _age(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    return f"{max(0.0, now - when):.1f}s ago"


def render_status(endpoint: str, rows: list[ServiceInstance], *, now: float | None = None) -> Table:
    """The status table of `rows` (instances of any services), as `loom-ha status` prints it."""
    now = time.time() if now is None else now
    table = Table(title=f"loom-ha services at {endpoint}", title_justify="left")
    for column in ("service", "instance", "address", "transport", "version", "weight"):
        table.add_column(column, overflow="fold")
    table.add_column("health")
    table.add_column("last heartbeat", justify="right")
    table.add_column("note", overflow="fold")
    for inst in rows:
        table.add_row(
            inst.service,
            inst.instance_id,
            inst.address,
            inst.transport,
            inst.version,
            str(inst.weight),
            Text(inst.health.value, style=_STYLE[inst.health]),
            _age(inst.last_heartbeat, now),
            inst.note,
        )
    passing = sum(1 for r in rows if r.passing)
    table.caption = f"{len(rows)} instances, {passing} passing"
    return table


async def run_status(
    console: Console, url: str | None = None, *, service: str | None = None, timeout: float = 5.0
) -> int:
    """Print the status table of the registry at `url`; return the exit code.

    `url` defaults to ``$LOOM_HA_REGISTRY``, else ``consul://127.0.0.1:8500`` (or
    ``CONSUL_HTTP_ADDR``). Exit codes: 0 shown, 1 registry unreachable or refused, 2 bad URL.
    """
    if url is None:
        url = os.environ.get("LOOM_HA_REGISTRY") or _default_consul_url()
    if url.startswith("memory://"):
        console.print(
            "[red]memory:// registries live inside one process: use consul:// or redis://"
        )
        return 2
    try:
        registry = open_registry(url, timeout=timeout)
    except ConfigurationError as exc:
        console.print(f"[red]{redact(str(exc), url)}")
        return 2
    try:
        async with registry:
            names = [service] if service else await registry.services()
            rows: list[ServiceInstance] = []
            for name in names:
                rows.extend(await registry.instances(name, passing_only=False))
            local = getattr(registry, "local_heartbeats", None)
            if local is not None and rows:
                # Consul's catalog lags check outputs by minutes; the agent knows the latest.
                beats: dict[tuple[str, str], float] = await local()
                rows = [
                    r.with_health(r.health, last_heartbeat=beats.get((r.service, r.instance_id)))
                    for r in rows
                ]
    except (RegistryError, ConfigurationError) as exc:
        console.print(f"[red]{redact(str(exc), url)}")
        return 1
    console.print(render_status(redact(registry.endpoint, url), rows))
    return 0
