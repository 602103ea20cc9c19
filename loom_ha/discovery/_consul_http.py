"""How `ConsulRegistry` talks to Consul: py-consul's asyncio client on a bounded aiohttp pool,
the error mapping (ACL denials included), the ACL rules a registry needs, and the formats
loom-ha writes into Consul and reads back (meta keys, durations, check outputs,
`/v1/health/service` entries).
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

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

from loom_ha._redact import redact
from loom_ha.discovery.instance import Health, ServiceInstance
from loom_ha.errors import ConfigurationError, RegistryError, RegistryUnavailableError

__all__ = [
    "DEFAULT_ADDRESS",
    "HEARTBEAT_SERVICE",
    "META_ADDRESS",
    "META_HEARTBEAT",
    "META_INSTANCE",
    "ConsulClient",
    "ConsulException",
    "NotFound",
    "TraceConfig",
    "acl_rules",
    "check_readable",
    "denied",
    "duration",
    "heartbeat_output",
    "heartbeat_times",
    "host_port",
    "map_consul_errors",
    "parse_address",
    "parse_consul_address",
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
DEFAULT_ADDRESS = ("http", "127.0.0.1", 8500)


def parse_consul_address(
    url: str | None = None, *, host: str | None = None, port: int | None = None
) -> tuple[str, str, int]:
    """(scheme, host, port) of the Consul HTTP API.

    Precedence: `url` (``consul://host:port``, ``http://``, ``https://``; ``consul+https://``
    for TLS; an ACL token as ``consul://TOKEN@host:port`` or ``?token=TOKEN``), then
    `host`/`port`, then ``CONSUL_HTTP_ADDR`` (``host:port`` or a URL; scheme https when
    ``CONSUL_HTTP_SSL=true``), then ``http://127.0.0.1:8500``.

    Raises:
        ConfigurationError: naming the URL (or variable) that is not a Consul HTTP address
            (its token shown as ``***``).
    """
    scheme, address, number, _ = parse_address(url, host, port)
    return scheme, address, number


def parse_address(
    url: str | None, host: str | None, port: int | None
) -> tuple[str, str, int, str | None]:
    """`parse_consul_address` plus the URL's token (None when it has none)."""
    if url is None and host is None and port is None:
        env = os.environ.get("CONSUL_HTTP_ADDR")
        if not env:
            return (*DEFAULT_ADDRESS, None)
        ssl_env = os.environ.get("CONSUL_HTTP_SSL", "").lower() == "true"
        candidate = env if "://" in env else f"{'https' if ssl_env else 'http'}://{env}"
        return _parse_url(candidate, what=f"CONSUL_HTTP_ADDR={redact(env, candidate)!r}")
    if url is not None:
        return _parse_url(url, what=f"Consul URL {redact(url, url)!r}")
    return "http", host or DEFAULT_ADDRESS[1], port or DEFAULT_ADDRESS[2], None


def _parse_url(url: str, *, what: str) -> tuple[str, str, int, str | None]:
    schemes = {"consul": "http", "http": "http", "consul+https": "https", "https": "https"}
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid {what}: {redact(str(exc), url)}") from exc
    if parts.scheme not in schemes:
        raise ConfigurationError(
            f"invalid {what}: scheme must be one of {', '.join(schemes)}, e.g. consul://host:8500"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    tokens = [unquote(parts.username)] if parts.username else []
    tokens += query.pop("token", [])
    if not parts.hostname or parts.path not in ("", "/") or query or parts.password is not None:
        raise ConfigurationError(
            f"invalid {what}: expected consul://host:port, with an ACL token as "
            "consul://TOKEN@host:port or consul://host:port?token=TOKEN, and nothing else"
        )
    if len(tokens) > 1 or tokens == [""]:
        raise ConfigurationError(f"invalid {what}: give one non-empty ACL token")
    token = tokens[0] if tokens else None
    return schemes[parts.scheme], parts.hostname, port or DEFAULT_ADDRESS[2], token


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


def denied(endpoint: str, reason: str, *, token: bool) -> str:
    """The message of an ACL denial (HTTP 403): which of the three cases it is, and the fix.

    Consul answers ``ACL not found`` for a token it does not know and ``Permission denied:
    Missing <permission>`` for a known (or the anonymous) token without the permission.
    Never contains the token: Consul's answers do not echo it.
    """
    if "acl not found" in reason.lower():
        return (
            f"consul at {endpoint} does not know the ACL token given ({reason}): check "
            "token=, the consul:// URL's token or CONSUL_HTTP_TOKEN"
        )
    if not token:
        return (
            f"consul at {endpoint} denied the request ({reason}): no ACL token was given; pass "
            "token=, consul://TOKEN@host:port or set CONSUL_HTTP_TOKEN"
        )
    return (
        f"consul at {endpoint} denied the request ({reason}): the ACL token lacks this "
        "permission; add it to the token's policy (loom_ha.discovery.consul.acl_rules)"
    )


@contextlib.contextmanager
def map_consul_errors(endpoint: str, *, token: bool = True) -> Iterator[None]:
    """Translate py-consul / aiohttp errors into loom-ha's, keeping the cause.

    An ACL denial is a `RegistryError`, never retried: the same token gets the same answer.
    `token` says whether the request carried one (for the message).
    """
    try:
        yield
    except (ACLPermissionDenied, ACLDisabled) as exc:
        raise RegistryError(denied(endpoint, str(exc).strip(), token=token)) from exc
    except (BadRequest, ClientError) as exc:
        raise RegistryError(f"consul at {endpoint} rejected the request: {exc}") from exc
    except (ConsulException, aiohttp.ClientError, OSError) as exc:
        # 5xx (no cluster leader during an election), timeouts, refused or reset connections.
        raise RegistryUnavailableError(f"consul at {endpoint} unavailable: {exc}") from exc


async def check_readable(client: Any, endpoint: str, service: str, *, token: bool) -> None:
    """Raise `RegistryError` when the request's token may not read `service`.

    Consul (1.8) filters what a token may not read out of ``/v1/health/service`` silently:
    an unreadable service looks like one without instances. The agent's
    ``/v1/agent/health/service/name/<service>`` checks ``service:read`` first and answers
    403; any other answer (200, 404, 429, 503: the local instances' health) means readable.
    """

    def status(response: Any) -> tuple[int, str]:
        return int(response.code), str(response.body)

    with map_consul_errors(endpoint, token=token):
        code, body = await client.http.get(
            status,
            f"/v1/agent/health/service/name/{service}",
            headers=client.prepare_headers(),
        )
    if code in (401, 403):
        reason = body.strip()
        if "acl not found" not in reason.lower():
            reason = f"Permission denied: Missing service:read on {service}"
        raise RegistryError(denied(endpoint, reason, token=token))


def acl_rules(register: Iterable[str] = (), *, read: Iterable[str] = ()) -> str:
    """The smallest Consul ACL policy (HCL rules) a `ConsulRegistry` needs.

    ``service:write`` on every service it registers instances of (`register`) and on the
    process heartbeat service; ``service:read`` on every service it only watches or lists
    (`read`); ``node:read`` on every node, without which ``/v1/health/service`` silently
    leaves out the instances on nodes the token may not read. A name ending in ``*`` is a
    prefix (``orders-*`` covers ``orders-eu``, ...).
    """
    rules: list[str] = []

    def rule(name: str, policy: str) -> None:
        kind = "service_prefix" if name.endswith("*") else "service"
        rules.append(f'{kind} "{name.removesuffix("*")}" {{ policy = "{policy}" }}')

    writes = list(register)
    for name in [HEARTBEAT_SERVICE, *writes] if writes else []:
        rule(name, "write")
    for name in read:
        rule(name, "read")
    rules.append('node_prefix "" { policy = "read" }')
    return "\n".join(rules) + "\n"


async def set_ttl_check(
    endpoint: str, update: Any, check_id: str, output: str, *, token: bool = True
) -> bool:
    """Set a TTL check with `update` (py-consul's pass / warn / fail); False if unknown."""
    with map_consul_errors(endpoint, token=token):
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
