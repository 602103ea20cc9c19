"""How `ConsulRegistry` talks to Consul: py-consul's asyncio client on a bounded aiohttp pool,
the error mapping, and the formats loom-ha writes into Consul and reads back (meta keys,
durations, check outputs, `/v1/health/service` entries).
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

try:
    import aiohttp
    import consul.aio
    import consul.base
    from consul.exceptions import (
        ACLDisabled,
        ACLPermissionDenied,
        BadRequest,
        ClientError,
        ConsulException,
        NotFound,
    )
except ImportError as exc:  # the consul extra brings py-consul and its aiohttp
    raise ImportError(
        "loom_ha.discovery.consul needs py-consul: pip install 'loom-ha[consul]'"
    ) from exc

from loom_ha.discovery.instance import Health, ServiceInstance
from loom_ha.errors import ConfigurationError, RegistryError, RegistryUnavailableError

__all__ = [
    "HEARTBEAT_SERVICE",
    "META_ADDRESS",
    "META_HEARTBEAT",
    "META_INSTANCE",
    "ConsulClient",
    "ConsulException",
    "NotFound",
    "TraceConfig",
    "duration",
    "heartbeat_output",
    "heartbeat_times",
    "host_port",
    "map_consul_errors",
    "parse_entry",
    "parse_heartbeat_output",
    "reports",
    "set_ttl_check",
    "status_check",
    "to_health",
]

TraceConfig = aiohttp.TraceConfig
# Meta keys loom-ha adds to what the instance carries (removed again when discovered).
META_INSTANCE = "loom_instance"
META_ADDRESS = "loom_address"
META_HEARTBEAT = "loom_heartbeat"  # the id of the process heartbeat it follows
# The name of every process's heartbeat service (hidden from `services()`).
HEARTBEAT_SERVICE = "loom-ha-heartbeat"
# An instance's status check (present only while it reports something other than plain
# passing) is a TTL check only because TTL is the one check type a client sets from outside;
# it is set on every change, and its timer must never fire (liveness is the alias check's
# job): ten years.
_STATUS_TTL = "87600h"
# Consul 1.8 answers 500 `CheckID "x" does not have associated TTL` for a check it does not
# know (e.g. after an agent restart, protoactor-dotnet #442); later versions answer 404.
_UNKNOWN_CHECK = ("does not have associated ttl", "unknown check")
_HEARTBEAT = re.compile(r"^loom-ha heartbeat (\d+(?:\.\d+)?)(?:; (.*))?$", re.DOTALL)


class _HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """py-consul's aiohttp adapter on a connection pool of at most `limit` connections.

    py-consul 1.8's `HTTPClient.__init__` always passes ``verify_ssl=`` (and ``ssl_context=``)
    to `aiohttp.TCPConnector`; aiohttp 3.14 deprecates both (a DeprecationWarning on every
    client). We skip that constructor and build the same session with ``ssl=``; requests and
    `close()` are py-consul's own. Requests beyond `limit` wait for a free connection:
    Consul's agent refuses more than ``http_max_conns_per_client`` (200) per client IP,
    shared by every process on the host.
    """

    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        *,
        verify: bool | str,
        cert: object,
        limit: int,
        trace_configs: Sequence[aiohttp.TraceConfig],
    ) -> None:
        consul.base.HTTPClient.__init__(self, host, port, scheme, verify=verify, cert=cert)
        self.loop = None
        tls: ssl.SSLContext | bool = True
        if scheme == "https":
            context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if isinstance(cert, tuple):
                context.load_cert_chain(*cert)
            elif isinstance(cert, str):
                context.load_cert_chain(cert)
            tls = context
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=limit),
            trace_configs=list(trace_configs) or None,
        )


class ConsulClient(consul.aio.Consul):  # type: ignore[misc]
    """py-consul's asyncio `Consul` whose requests share a pool of at most `limit` connections."""

    def __init__(
        self, *, limit: int, trace_configs: Sequence[aiohttp.TraceConfig], **options: object
    ) -> None:
        self._limit = limit
        self._trace_configs = tuple(trace_configs)
        super().__init__(**options)

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: object = None
    ) -> _HTTPClient:
        return _HTTPClient(
            host,
            port,
            scheme,
            verify=verify,
            cert=cert,
            limit=self._limit,
            trace_configs=self._trace_configs,
        )


@contextlib.contextmanager
def map_consul_errors(endpoint: str) -> Iterator[None]:
    """Translate py-consul / aiohttp errors into loom-ha's, keeping the cause."""
    try:
        yield
    except (ACLPermissionDenied, ACLDisabled) as exc:
        raise RegistryError(
            f"consul at {endpoint} denied the request ({exc}): set CONSUL_HTTP_TOKEN or token="
        ) from exc
    except (BadRequest, ClientError) as exc:
        raise RegistryError(f"consul at {endpoint} rejected the request: {exc}") from exc
    except (ConsulException, aiohttp.ClientError, OSError) as exc:
        # 5xx (no cluster leader during an election), timeouts, refused or reset connections.
        raise RegistryUnavailableError(f"consul at {endpoint} unavailable: {exc}") from exc


async def set_ttl_check(endpoint: str, update: Any, check_id: str, output: str) -> bool:
    """Set a TTL check with `update` (py-consul's pass / warn / fail); False if unknown."""
    with map_consul_errors(endpoint):
        try:
            await update(check_id, notes=output)
        except NotFound:
            return False
        except ConsulException as exc:
            if any(marker in str(exc).lower() for marker in _UNKNOWN_CHECK):
                return False
            raise
    return True


def reports(instance: ServiceInstance) -> bool:
    """True when `instance` has something to report beyond plain "passing"."""
    return instance.health is not Health.PASSING or bool(instance.note)


def status_check(check_id: str, instance: ServiceInstance) -> dict[str, str]:
    """The check that carries what `instance` reports, while `reports(instance)`.

    Only then: every check on an agent costs each alias check a copy a minute (Consul 1.8
    re-reads all local checks), so a plain passing instance has its alias check alone.
    A check is registered without output and Consul syncs an output-only change to the
    catalog only every ``check_update_interval`` (5 min): it starts in the *other*
    non-passing state, so the update that writes the note is a status change, synced at
    once, and the instance is never shown passing meanwhile.
    """
    start = {Health.CRITICAL: Health.WARNING, Health.WARNING: Health.CRITICAL}
    return {
        "CheckID": check_id,
        "Name": "loom-ha instance status",
        "TTL": _STATUS_TTL,
        "Status": start.get(instance.health, instance.health).value,
        "Notes": "health reported by the instance (set_health, liveness probe)",
    }


def heartbeat_output(instance: ServiceInstance) -> str:
    """The check output of a heartbeat or report: its time, then the health note if any."""
    text = f"loom-ha heartbeat {instance.last_heartbeat or 0.0:.3f}"
    return f"{text}; {instance.note}" if instance.note else text


def parse_heartbeat_output(output: str) -> tuple[float | None, str]:
    """(heartbeat time, note) from a check output written by `heartbeat_output`."""
    match = _HEARTBEAT.match(output or "")
    if match is None:
        return None, output or ""
    return float(match.group(1)) or None, match.group(2) or ""


def to_health(status: str) -> Health:
    """Health of a Consul check status."""
    try:
        return Health(status)
    except ValueError:
        return Health.CRITICAL  # "maintenance" and anything unknown: not routable


def duration(seconds: float) -> str:
    """A Go duration Consul accepts (whole milliseconds, at least 1)."""
    return f"{max(1, round(seconds * 1000))}ms"


def host_port(address: str) -> tuple[str | None, int | None]:
    """Host and port of a transport URL or ``host:port`` (for Consul's Address/Port)."""
    if not address:
        return None, None
    try:
        parts = urlsplit(address if "://" in address else f"//{address}")
        return parts.hostname, parts.port
    except ValueError:
        return None, None


def parse_entry(service: str, node: Mapping[str, Any]) -> ServiceInstance | None:
    """A ServiceInstance from one `/v1/health/service` entry (None if not representable).

    Health is the worst of the entry's checks (the process heartbeat's alias check, the
    instance's status check, the node's); the note says why it is not passing.
    """
    svc = node.get("Service") or {}
    meta = dict(svc.get("Meta") or {})
    instance_id = meta.pop(META_INSTANCE, None) or svc.get("ID", "")
    address = meta.pop(META_ADDRESS, None)
    meta.pop(META_HEARTBEAT, None)
    if address is None:
        address = f"{svc.get('Address')}:{svc.get('Port')}" if svc.get("Address") else ""
    checks = node.get("Checks") or []
    by_id = {str(c.get("CheckID", "")): c for c in checks}
    own = by_id.get(f"loom-ha:{svc.get('ID', '')}")
    when, note = parse_heartbeat_output(str(own.get("Output", ""))) if own else (None, "")
    alive = by_id.get(f"loom-ha-alive:{svc.get('ID', '')}")
    if alive is not None and to_health(str(alive.get("Status"))) is not Health.PASSING:
        note = f"process heartbeat lost: {alive.get('Output') or 'TTL expired'}"
    try:
        return ServiceInstance(
            service=service,
            instance_id=instance_id,
            address=address,
            tags=tuple(svc.get("Tags") or ()),
            meta=meta,
            weight=int((svc.get("Weights") or {}).get("Passing", 1)) or 1,
            health=Health.worst([to_health(str(c.get("Status"))) for c in checks]),
            note=note,
            last_heartbeat=when,
        )
    except ConfigurationError:
        return None  # a foreign service whose id or meta loom-ha cannot represent


def heartbeat_times(
    checks: Mapping[str, Mapping[str, Any]], services: Mapping[str, Mapping[str, Any]]
) -> dict[tuple[str, str], float]:
    """(service, instance id) -> last heartbeat time, from an agent's checks and services.

    An instance's time is its process heartbeat's (the alias it follows), or its own last
    status report if later (or if it has no process heartbeat: written by an older client).
    """
    beats: dict[tuple[str, str], float] = {}
    processes: dict[str, float] = {}
    for check_id, check in checks.items():
        when, _ = parse_heartbeat_output(str(check.get("Output", "")))
        if when is None:
            continue
        if check_id.startswith(f"{HEARTBEAT_SERVICE}:"):
            processes[check_id] = when
        elif check_id.startswith("loom-ha:"):
            _, service, instance_id = check_id.split(":", 2)
            beats[service, instance_id] = when
    for svc in services.values():
        meta = svc.get("Meta") or {}
        when = processes.get(meta.get(META_HEARTBEAT, ""))
        if when is not None:
            key = (str(svc.get("Service")), str(meta.get(META_INSTANCE) or svc.get("ID")))
            beats[key] = max(when, beats.get(key, 0.0))
    return beats
