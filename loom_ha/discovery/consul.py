"""ConsulRegistry: instances as Consul services kept alive by one TTL check per process.

Each registry (one per process, in practice) registers one heartbeat service per TTL it
uses, ``loom-ha-heartbeat`` with a TTL check; every instance is a service whose **alias
check** follows that heartbeat (critical as soon as the process stops beating, Consul >=
1.8), plus a status check while it reports something other than plain passing
(`set_health`, a failing liveness probe). A heartbeat round is one request however many
instances the process serves; discovery uses ``/v1/health/service`` blocking queries, one
per watched service, on a connection pool of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from loom_ha.discovery._consul_http import (
    HEARTBEAT_SERVICE,
    META_ADDRESS,
    META_HEARTBEAT,
    META_INSTANCE,
    ConsulClient,
    ConsulException,
    TraceConfig,
    acl_rules,
    check_readable,
    duration,
    heartbeat_output,
    heartbeat_times,
    host_port,
    map_consul_errors,
    parse_address,
    parse_consul_address,
    parse_entry,
    parse_heartbeat_output,
    reports,
    set_ttl_check,
    status_check,
)
from loom_ha.discovery.base import ServiceRegistry
from loom_ha.discovery.heartbeat import fan_out
from loom_ha.discovery.instance import Health, ServiceInstance
from loom_ha.errors import ConfigurationError

__all__ = [
    "HEARTBEAT_SERVICE",
    "ConsulRegistry",
    "acl_rules",
    "heartbeat_output",
    "map_consul_errors",
    "parse_consul_address",
    "parse_heartbeat_output",
]

log = logging.getLogger("loom_ha.discovery")

# Consul reaps critical services at most once a minute, whatever is asked (agent docs).
_MIN_DEREGISTER_AFTER = 60.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
# Every this many rounds, a heartbeat also lists the process's services on the agent (one
# request, O(instances) bytes) to register again any removed behind its back; an agent
# restart is noticed at once (its heartbeat check is gone), this is for the rest.
RECONCILE_EVERY = 10
# Connections a process keeps for its heartbeat rounds, apart from every other call: a
# round must not wait behind its own registration storm.
_BEAT_CONNECTIONS = 2
# Most left-behind instances (a registration raised, yet reached the agent) one heartbeat
# round removes; one request each.
_STRAYS_PER_ROUND = 8


class ConsulRegistry(ServiceRegistry):
    """A registry on Consul: instances are agent services bound to one process heartbeat.

    Registrations go to the agent at the configured address (the local agent, in
    production). Per heartbeat round the process sends one TTL pass, plus one status update
    per instance whose health changed; when the process dies, its heartbeat check expires
    and the agent turns every instance's alias check critical at once. When the agent
    forgets the process (restart), the next round registers everything again.
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
        probe_timeout: float | None = None,
        max_connections: int = 8,
        max_watches: int = 32,
        trace_configs: Sequence[TraceConfig] = (),
        process_id: str | None = None,
    ) -> None:
        """`ttl`, `interval`, `timeout`, `deregister_after`, `watch_wait`, `probe_timeout`: see
        `ServiceRegistry` (`deregister_after` below 60 s is raised to 60 s, Consul's floor).

        Args:
            url: ``consul://host:port`` (``consul+https://`` for TLS, or http(s)://), with an
                optional ACL token: ``consul://TOKEN@host:port`` or ``?token=TOKEN``.
            host: instead of `url` (with `port`); neither: ``CONSUL_HTTP_ADDR`` or 127.0.0.1:8500.
            port: instead of `url` (with `host`).
            token: ACL token; default the URL's, else ``CONSUL_HTTP_TOKEN``. Never shown in
                `repr`, `statistics()`, errors or logs. `acl_rules()` writes its policy.
            datacenter: query this datacenter (default: the agent's).
            verify: TLS verification (bool or CA bundle path); cert: client certificate.
            max_connections: connection pool of calls (registrations, reports, reads);
                more calls at once wait for a free one.
            max_watches: most services watched at once; each holds one connection for its
                blocking query. A process holds at most 2 (heartbeats) + `max_connections`
                + `max_watches` connections; keep the sum over a host's processes below the
                agent's ``http_max_conns_per_client`` (200 by default).
            trace_configs: aiohttp trace configs for every request (metrics, tracing).
            process_id: names this registry's heartbeat service; default host-pid-random.

        Raises:
            ConfigurationError: the address or a limit is invalid (named in the message).
        """
        scheme, self.host, self.port, url_token = parse_address(url, host, port)
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be >= 1, got {max_connections}")
        super().__init__(
            ttl=ttl,
            interval=interval,
            timeout=timeout,
            deregister_after=max(deregister_after, _MIN_DEREGISTER_AFTER),
            watch_wait=watch_wait,
            probe_timeout=probe_timeout,
            max_watches=max_watches,
            concurrency=max_connections,
            endpoint=f"{scheme}://{self.host}:{self.port}",
        )
        self.scheme = scheme
        env_token = os.environ.get("CONSUL_HTTP_TOKEN")
        self.token = (token if token is not None else url_token or env_token) or None
        self.datacenter = datacenter
        self.process_id = _UNSAFE.sub("-", process_id or _default_process_id())
        self.max_connections = max_connections
        self.max_watches = max_watches
        self._verify = verify
        self._cert = cert
        self._trace_configs = tuple(trace_configs)
        self._clients: dict[str, Any] = {}
        self._beating: set[str] = set()  # heartbeat services the agent has (as far as we know)
        self._beat_lock = asyncio.Lock()
        self._rounds: dict[str, int] = {}
        self._readable: set[str] = set()  # services the token was seen allowed to read
        self._unsure: set[str] = set()  # heartbeats with a registration that may have landed

    def _client(self, pool: str = "calls") -> Any:
        # Built lazily: aiohttp wants a running event loop for its session. Three pools:
        # heartbeat rounds and blocking queries never wait behind other calls.
        client = self._clients.get(pool)
        if client is None:
            limits = {"beats": _BEAT_CONNECTIONS, "watches": self.max_watches}
            client = ConsulClient(
                limit=limits.get(pool, self.max_connections),
                trace_configs=self._trace_configs,
                host=self.host,
                port=self.port,
                scheme=self.scheme,
                dc=self.datacenter,
                verify=self._verify,
                cert=self._cert,
            )
            # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; we prefer the argument.
            client.token = self.token
            self._clients[pool] = client
        return client

    @override
    def _errors(self) -> contextlib.AbstractContextManager[None]:
        """`map_consul_errors` for this registry (an ACL denial says whether a token was set)."""
        return map_consul_errors(self.endpoint, token=self.token is not None)

    @staticmethod
    def service_id(instance: ServiceInstance) -> str:
        """Consul service id of `instance` (``service:instance``, unique per agent)."""
        return f"{instance.service}:{instance.instance_id}"

    @classmethod
    def check_id(cls, instance: ServiceInstance) -> str:
        """Consul check id of `instance`'s status check (the health it reports)."""
        return f"loom-ha:{cls.service_id(instance)}"

    @classmethod
    def alive_check_id(cls, instance: ServiceInstance) -> str:
        """Consul check id of `instance`'s alias check on its process heartbeat."""
        return f"loom-ha-alive:{cls.service_id(instance)}"

    def heartbeat_id(self, ttl: float) -> str:
        """Service id (and check id) of this registry's heartbeat for `ttl`."""
        return f"{HEARTBEAT_SERVICE}:{self.process_id}:{duration(ttl)}"

    @override
    async def _put(self, instance: ServiceInstance, ttl: float) -> None:
        beat = await self._ensure_heartbeat(ttl)
        host, port = host_port(instance.address)
        alive = {
            "CheckID": self.alive_check_id(instance),
            "Name": "loom-ha process heartbeat",
            "AliasService": beat,
            # Passing from the start: the process registering it is beating right now.
            "Status": Health.PASSING.value,
            "DeregisterCriticalServiceAfter": duration(self.deregister_after),
            "Notes": f"critical when {beat} stops (heartbeat every <= {ttl / 3:.3g}s)",
        }
        meta = {
            **instance.meta,
            META_INSTANCE: instance.instance_id,
            META_ADDRESS: instance.address,
            META_HEARTBEAT: beat,
        }
        reported = reports(instance)
        try:
            await self._client().agent.service.register(
                instance.service,
                service_id=self.service_id(instance),
                address=host,
                port=port,
                tags=list(instance.tags),
                meta=meta,
                weights={"Passing": instance.weight, "Warning": 1},
                check=alive,
                extra_checks=[status_check(self.check_id(instance), instance)] if reported else [],
            )
        except BaseException:
            # A request given up on (timeout) may still be applied: an agent wedged behind a
            # frozen Consul leader applies it when it recovers. The next round looks.
            self._unsure.add(beat)
            raise
        if reported:  # a check is registered without output: write the reason
            await self._set_status(instance, "calls")

    @override
    async def _pulse(self, instance: ServiceInstance, ttl: float, pool: str = "calls") -> bool:
        checks = self._client(pool).agent.check
        if not reports(instance):
            # Passing, nothing to say: the alias check says it all, the status check goes.
            await checks.deregister(self.check_id(instance))
            return True
        if await self._set_status(instance, pool):
            return True
        try:  # its first report: add the status check to the instance's service
            definition = status_check(self.check_id(instance), instance)
            await checks.register(
                definition.pop("Name"),
                check=definition,  # this endpoint names the id "ID", not "CheckID"
                check_id=definition.pop("CheckID"),
                service_id=self.service_id(instance),
            )
        except ConsulException as exc:
            if "does not exist" not in str(exc):
                raise
            self._beating.discard(self.heartbeat_id(ttl))  # the agent forgot: maybe all
            return False
        return await self._set_status(instance, pool)

    async def _set_status(self, instance: ServiceInstance, pool: str) -> bool:
        """Set the status check (pass / warn / fail, with the note); False if it is absent."""
        checks = self._client(pool).agent.check
        update = {Health.PASSING: checks.ttl_pass, Health.WARNING: checks.ttl_warn}.get(
            instance.health, checks.ttl_fail
        )
        return await set_ttl_check(
            self.endpoint,
            update,
            self.check_id(instance),
            heartbeat_output(instance),
            token=self.token is not None,
        )

    @override
    async def _pulse_all(
        self,
        instances: Sequence[ServiceInstance],
        changed: Sequence[ServiceInstance],
        ttl: float,
    ) -> list[ServiceInstance]:
        beat = self.heartbeat_id(ttl)
        if not instances and beat not in self._beating:
            # Nothing registered: the registration that started this group was refused (an
            # ACL denial, say). Beating would repeat that refusal every round, forever.
            return []
        rounds = self._rounds[beat] = self._rounds.get(beat, 0) + 1
        forgotten: list[ServiceInstance] = []
        if not await self._beat(beat, len(instances)):
            # Agent restarted (or the heartbeat was removed): which instances survived?
            self._beating.discard(beat)
            await self._ensure_heartbeat(ttl, pool="beats")
            forgotten = await self._reconcile(beat, instances)
        elif rounds % RECONCILE_EVERY == 0 or beat in self._unsure:
            forgotten = await self._reconcile(beat, instances)
        lost = {self.service_id(i) for i in forgotten}

        async def report(instance: ServiceInstance) -> None:  # in a task of its own: map here
            with self._errors():
                if not await self._pulse(instance, ttl, pool="beats"):
                    forgotten.append(instance)

        failed = await fan_out([i for i in changed if self.service_id(i) not in lost], report)
        if failed:
            raise failed[0][1]
        return forgotten

    async def _reconcile(
        self, beat: str, instances: Sequence[ServiceInstance]
    ) -> list[ServiceInstance]:
        """Those of `instances` (all bound to `beat`) the agent does not have; and remove
        from the agent what is bound to `beat` but registered by no one here (a
        registration that raised, yet reached the agent: it would stay passing)."""
        known = await self._client("beats").agent.services(
            filter_expr=f'Meta.{META_HEARTBEAT} == "{beat}"'
        )
        known, ours = known or {}, {self.service_id(i) for i in instances}
        strays = [  # not one of this round's own, deregistered meanwhile (close() races it)
            service_id
            for service_id, svc in known.items()
            if service_id not in ours
            and (svc.get("Service"), (svc.get("Meta") or {}).get(META_INSTANCE))
            not in self._registrations
        ]
        if strays:
            log.warning("removing %d instance(s) whose registration raised", len(strays))
        # A few per round, so that the round stays inside its deadline; the rest next round.
        for service_id in strays[:_STRAYS_PER_ROUND]:
            await self._client("beats").agent.service.deregister(service_id)
        if len(strays) <= _STRAYS_PER_ROUND:
            self._unsure.discard(beat)
        return [i for i in instances if self.service_id(i) not in known]

    @override
    async def _remove(self, instance: ServiceInstance) -> None:
        await self._client().agent.service.deregister(self.service_id(instance))

    @override
    async def _remove_all(self, instances: Sequence[ServiceInstance]) -> None:
        # Instances first: removing the heartbeat first would show them critical meanwhile.
        try:
            await super()._remove_all(instances)
        finally:
            beats, self._beating = sorted(self._beating), set()
            for beat in beats:
                await self._call(self._client().agent.service.deregister(beat), self.timeout)

    @override
    async def _query(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[ServiceInstance]]:
        client = self._client("watches" if index else "calls")
        if service not in self._readable:  # once: Consul hides what a token may not read
            await check_readable(client, self.endpoint, service, token=self.token is not None)
            self._readable.add(service)
        raw_index, nodes = await client.health.service(
            service, index=index or None, wait=duration(wait) if index else None
        )
        found = [i for i in (parse_entry(service, n) for n in nodes or ()) if i is not None]
        return int(raw_index), found

    @override
    async def _services(self) -> list[str]:
        _, services = await self._client().catalog.services()
        return [name for name in services or {} if name not in ("consul", HEARTBEAT_SERVICE)]

    @override
    async def _close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def local_heartbeats(self) -> dict[tuple[str, str], float]:
        """Last heartbeat time of every loom-ha instance on the connected agent.

        The agent knows the latest check output at once; the catalog (what `instances()`
        reads) only syncs output-only changes every ``check_update_interval`` (5 min).
        """
        self._check_open()
        checks = await self._call(self._client().agent.checks(), self.timeout)
        services = await self._call(self._client().agent.services(), self.timeout)
        return heartbeat_times(checks or {}, services or {})

    async def _ensure_heartbeat(self, ttl: float, pool: str = "calls") -> str:
        """Register this process's heartbeat service for `ttl` unless the agent has it."""
        beat = self.heartbeat_id(ttl)
        if beat in self._beating:
            return beat
        async with self._beat_lock:
            if beat in self._beating:
                return beat
            check = {
                "CheckID": beat,
                "Name": "loom-ha TTL heartbeat",
                "TTL": duration(ttl),
                "Status": Health.PASSING.value,
                "DeregisterCriticalServiceAfter": duration(self.deregister_after),
                "Notes": f"heartbeat every <= {ttl / 3:.3g}s for every instance of the process",
            }
            meta = {"process": self.process_id, "pid": str(os.getpid())}
            await self._client(pool).agent.service.register(
                HEARTBEAT_SERVICE, service_id=beat, meta=meta, check=check
            )
            # A check is registered without output: write the first beat's time now.
            await self._beat(beat, 0)
            self._beating.add(beat)
        return beat

    async def _beat(self, beat: str, count: int) -> bool:
        """Pass this process's heartbeat check; False if the agent does not know it."""
        output = f"loom-ha heartbeat {time.time():.3f}; {count} instance(s)"
        return await set_ttl_check(
            self.endpoint,
            self._client("beats").agent.check.ttl_pass,
            beat,
            output,
            token=self.token is not None,
        )


def _default_process_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
