"""ConsulRegistry: instances as Consul services with a TTL check, discovered by blocking queries.

Each instance is an agent service whose one check is a TTL check (``DeregisterCriticalServiceAfter``
set); the heartbeat is a check update (pass / warn / fail) carrying the time in its output.
Talks to Consul through py-consul's asyncio client (aiohttp).
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from typing_extensions import override

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

from loom_ha.discovery.base import ServiceRegistry
from loom_ha.discovery.instance import Health, ServiceInstance
from loom_ha.errors import ConfigurationError, RegistryError, RegistryUnavailableError

__all__ = ["ConsulRegistry", "parse_consul_address"]

DEFAULT_ADDRESS = ("http", "127.0.0.1", 8500)
# Consul reaps critical services at most once a minute, whatever is asked (agent docs).
_MIN_DEREGISTER_AFTER = 60.0
# Meta keys loom-ha adds to what the instance carries (removed again when discovered).
META_INSTANCE = "loom_instance"
META_ADDRESS = "loom_address"
_HEARTBEAT = re.compile(r"^loom-ha heartbeat (\d+(?:\.\d+)?)(?:; (.*))?$", re.DOTALL)
# Consul 1.8 answers 500 `CheckID "x" does not have associated TTL` for a check it does not
# know (e.g. after an agent restart, protoactor-dotnet #442); later versions answer 404.
_UNKNOWN_CHECK = ("does not have associated ttl", "unknown check")


def parse_consul_address(
    url: str | None = None, *, host: str | None = None, port: int | None = None
) -> tuple[str, str, int]:
    """(scheme, host, port) of the Consul HTTP API.

    Precedence: `url` (``consul://host:port``, ``http://``, ``https://``; ``consul+https://``
    for TLS), then `host`/`port`, then ``CONSUL_HTTP_ADDR`` (``host:port`` or a URL; scheme
    https when ``CONSUL_HTTP_SSL=true``), then ``http://127.0.0.1:8500``.

    Raises:
        ConfigurationError: naming the URL (or variable) that is not a Consul HTTP address.
    """
    if url is None and host is None and port is None:
        env = os.environ.get("CONSUL_HTTP_ADDR")
        if not env:
            return DEFAULT_ADDRESS
        ssl_env = os.environ.get("CONSUL_HTTP_SSL", "").lower() == "true"
        candidate = env if "://" in env else f"{'https' if ssl_env else 'http'}://{env}"
        return _parse_url(candidate, what=f"CONSUL_HTTP_ADDR={env!r}")
    if url is not None:
        return _parse_url(url, what=f"Consul URL {url!r}")
    return "http", host or DEFAULT_ADDRESS[1], port or DEFAULT_ADDRESS[2]


def _parse_url(url: str, *, what: str) -> tuple[str, str, int]:
    schemes = {"consul": "http", "http": "http", "consul+https": "https", "https": "https"}
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid {what}: {exc}") from exc
    if parts.scheme not in schemes:
        raise ConfigurationError(
            f"invalid {what}: scheme must be one of {', '.join(schemes)}, e.g. consul://host:8500"
        )
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigurationError(f"invalid {what}: expected consul://host:port and nothing else")
    return schemes[parts.scheme], parts.hostname, port or DEFAULT_ADDRESS[2]


class _HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """py-consul's aiohttp adapter, built without aiohttp's deprecated connector arguments.

    py-consul 1.8's `HTTPClient.__init__` always passes ``verify_ssl=`` (and ``ssl_context=``)
    to `aiohttp.TCPConnector`; aiohttp 3.14 deprecates both (a DeprecationWarning on every
    client). We skip that constructor and build the same session with ``ssl=``; requests and
    `close()` are py-consul's own.
    """

    def __init__(
        self, host: str, port: int, scheme: str, *, verify: bool | str, cert: object
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
        # No connection limit: every watch holds one connection for its blocking query.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls, limit=0))


class _Consul(consul.aio.Consul):  # type: ignore[misc]
    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: object = None
    ) -> _HTTPClient:
        return _HTTPClient(host, port, scheme, verify=verify, cert=cert)


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


def heartbeat_output(instance: ServiceInstance) -> str:
    """The check output of a heartbeat: its time, then the health note if any."""
    text = f"loom-ha heartbeat {instance.last_heartbeat or 0.0:.3f}"
    return f"{text}; {instance.note}" if instance.note else text


def parse_heartbeat_output(output: str) -> tuple[float | None, str]:
    """(heartbeat time, note) from a check output written by `heartbeat_output`."""
    match = _HEARTBEAT.match(output or "")
    if match is None:
        return None, output or ""
    return float(match.group(1)) or None, match.group(2) or ""


class ConsulRegistry(ServiceRegistry):
    """A registry on Consul: each instance is a service with a TTL check on the agent.

    Registrations go to the agent at the configured address (the local agent, in
    production); discovery uses ``/v1/health/service`` with blocking queries. When the agent
    forgets an instance (restart), the next heartbeat registers it again.
    """

    backend = "consul"

    def __init__(
        self,
        url: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        datacenter: str | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        ttl: float = 10.0,
        interval: float | None = None,
        timeout: float = 5.0,
        deregister_after: float = 60.0,
        watch_wait: float = 10.0,
    ) -> None:
        """`ttl`, `interval`, `timeout`, `deregister_after`, `watch_wait`: see `ServiceRegistry`
        (`deregister_after` below 60 s is raised to 60 s, Consul's floor).

        Args:
            url: ``consul://host:port`` (``consul+https://`` for TLS, or http(s)://).
            host: instead of `url` (with `port`); neither: ``CONSUL_HTTP_ADDR`` or 127.0.0.1:8500.
            port: instead of `url` (with `host`).
            token: ACL token; default ``CONSUL_HTTP_TOKEN``.
            datacenter: query this datacenter (default: the agent's).
            verify: TLS verification (bool or CA bundle path); cert: client certificate.

        Raises:
            ConfigurationError: the address is invalid (named in the message).
        """
        scheme, self.host, self.port = parse_consul_address(url, host=host, port=port)
        super().__init__(
            ttl=ttl,
            interval=interval,
            timeout=timeout,
            deregister_after=max(deregister_after, _MIN_DEREGISTER_AFTER),
            watch_wait=watch_wait,
            endpoint=f"{scheme}://{self.host}:{self.port}",
        )
        self.scheme = scheme
        self.token = token if token is not None else os.environ.get("CONSUL_HTTP_TOKEN") or None
        self.datacenter = datacenter
        self._verify = verify
        self._cert = cert
        self._consul: Any = None

    def _client(self) -> Any:
        # Built lazily: aiohttp wants a running event loop for its session.
        if self._consul is None:
            client = _Consul(
                host=self.host,
                port=self.port,
                scheme=self.scheme,
                dc=self.datacenter,
                verify=self._verify,
                cert=self._cert,
            )
            # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; we prefer the argument.
            client.token = self.token
            self._consul = client
        return self._consul

    @staticmethod
    def service_id(instance: ServiceInstance) -> str:
        """Consul service id of `instance` (``service:instance``, unique per agent)."""
        return f"{instance.service}:{instance.instance_id}"

    @classmethod
    def check_id(cls, instance: ServiceInstance) -> str:
        """Consul check id of `instance`'s TTL check."""
        return f"loom-ha:{cls.service_id(instance)}"

    @override
    async def _put(self, instance: ServiceInstance, ttl: float) -> None:
        host, port = _host_port(instance.address)
        check = {
            "CheckID": self.check_id(instance),
            "Name": "loom-ha TTL heartbeat",
            "TTL": _duration(ttl),
            "DeregisterCriticalServiceAfter": _duration(self.deregister_after),
            "Status": instance.health.value,
            "Notes": f"heartbeat every <= {ttl / 3:.3g}s",
        }
        meta = {
            **instance.meta,
            META_INSTANCE: instance.instance_id,
            META_ADDRESS: instance.address,
        }
        with map_consul_errors(self.endpoint):
            await self._client().agent.service.register(
                instance.service,
                service_id=self.service_id(instance),
                address=host,
                port=port,
                tags=list(instance.tags),
                meta=meta,
                weights={"Passing": instance.weight, "Warning": 1},
                check=check,
            )

    @override
    async def _pulse(self, instance: ServiceInstance, ttl: float) -> bool:
        checks = self._client().agent.check
        update = {Health.PASSING: checks.ttl_pass, Health.WARNING: checks.ttl_warn}.get(
            instance.health, checks.ttl_fail
        )
        with map_consul_errors(self.endpoint):
            try:
                await update(self.check_id(instance), notes=heartbeat_output(instance))
            except NotFound:
                return False
            except ConsulException as exc:
                if any(marker in str(exc).lower() for marker in _UNKNOWN_CHECK):
                    return False
                raise
        return True

    @override
    async def _remove(self, instance: ServiceInstance) -> None:
        with map_consul_errors(self.endpoint):
            await self._client().agent.service.deregister(self.service_id(instance))

    @override
    async def _query(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[ServiceInstance]]:
        with map_consul_errors(self.endpoint):
            raw_index, nodes = await self._client().health.service(
                service, index=index or None, wait=_duration(wait) if index else None
            )
        found = [i for i in (self._parse(service, n) for n in nodes or ()) if i is not None]
        return int(raw_index), found

    @override
    async def _services(self) -> list[str]:
        with map_consul_errors(self.endpoint):
            _, services = await self._client().catalog.services()
        return [name for name in services or {} if name != "consul"]

    @override
    async def _close(self) -> None:
        client, self._consul = self._consul, None
        if client is not None:
            await client.close()

    async def local_heartbeats(self) -> dict[tuple[str, str], float]:
        """Last heartbeat time of every loom-ha instance on the connected agent.

        The agent knows the latest check output at once; the catalog (what `instances()`
        reads) only syncs output-only changes every ``check_update_interval`` (5 min).
        """
        self._check_open()
        with map_consul_errors(self.endpoint):
            checks = await self._call(self._client().agent.checks(), self.timeout)
        beats: dict[tuple[str, str], float] = {}
        for check in (checks or {}).values():
            check_id = str(check.get("CheckID", ""))
            if not check_id.startswith("loom-ha:"):
                continue
            _, service, instance_id = check_id.split(":", 2)
            when, _ = parse_heartbeat_output(str(check.get("Output", "")))
            if when is not None:
                beats[service, instance_id] = when
        return beats

    def _parse(self, service: str, node: Mapping[str, Any]) -> ServiceInstance | None:
        """A ServiceInstance from one `/v1/health/service` entry (None if not representable)."""
        svc = node.get("Service") or {}
        meta = dict(svc.get("Meta") or {})
        instance_id = meta.pop(META_INSTANCE, None) or svc.get("ID", "")
        address = meta.pop(META_ADDRESS, None)
        if address is None:
            address = f"{svc.get('Address')}:{svc.get('Port')}" if svc.get("Address") else ""
        checks = node.get("Checks") or []
        states = [_health(str(c.get("Status"))) for c in checks]
        own = [c for c in checks if str(c.get("CheckID", "")).startswith("loom-ha:")]
        when, note = parse_heartbeat_output(str(own[0].get("Output", ""))) if own else (None, "")
        try:
            return ServiceInstance(
                service=service,
                instance_id=instance_id,
                address=address,
                tags=tuple(svc.get("Tags") or ()),
                meta=meta,
                weight=int((svc.get("Weights") or {}).get("Passing", 1)) or 1,
                health=Health.worst(states),
                note=note,
                last_heartbeat=when,
            )
        except ConfigurationError:
            return None  # a foreign service whose id or meta loom-ha cannot represent


def _health(status: str) -> Health:
    try:
        return Health(status)
    except ValueError:
        return Health.CRITICAL  # "maintenance" and anything unknown: not routable


def _duration(seconds: float) -> str:
    """A Go duration Consul accepts (whole milliseconds, at least 1)."""
    return f"{max(1, round(seconds * 1000))}ms"


def _host_port(address: str) -> tuple[str | None, int | None]:
    """Host and port of a transport URL or ``host:port`` (for Consul's Address/Port)."""
    if not address:
        return None, None
    try:
        parts = urlsplit(address if "://" in address else f"//{address}")
        return parts.hostname, parts.port
    except ValueError:
        return None, None
