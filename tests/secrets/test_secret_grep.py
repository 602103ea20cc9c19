"""No secret given in a URL shows anywhere a user may look, on any broker.

Transports (and registries) are built from URLs that carry a distinctive secret, work
against real servers that require it, fail once with a wrong one, and then everything a
user may read or ship is searched for the secrets: log records, exception texts (causes
included), ``repr()``/``str()`` of transports, every field of ``statistics()``, the
Prometheus exposition and ``loom-ha status`` output. NATS nkeys and creds files are not
covered here (tests/nats has them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loom_ha.config import create_transport
from loom_ha.discovery import ServiceInstance, open_registry
from loom_ha.errors import LoomHAError, RegistryError, TransientError
from loom_ha.event import CloudEvent
from loom_ha.metrics import TransportMetrics
from loom_ha.redis import RedisPubSubTransport
from loom_ha.testing.collect import Collector
from loom_ha.testing.consul_servers import ConsulAgent
from loom_ha.testing.nats_servers import NatsServer
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.redis_sentinel import RedisSentinelCluster
from loom_ha.testing.redis_servers import acl_user
from loom_ha.transport import Transport

pytestmark = [pytest.mark.redis, pytest.mark.nats, pytest.mark.consul, pytest.mark.timeout(180)]

MARK = "S3CRET"
"""In every secret below (the Consul token is a UUID, searched for itself)."""
REDIS_PW = "redis:pw/é@S3CRET"  # needs percent-encoding in a URL
SENTINEL_PW = "sentinel-S3CRET"
NATS_PW = "nats:pw/é@S3CRET"
NATS_TOKEN = "token-S3CRET"
WRONG = "wrong-S3CRET"


def _leaves(value: object) -> Iterator[str]:
    """str and repr of every field, item and key inside `value`, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _leaves(getattr(value, field.name))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(key)
            yield from _leaves(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _leaves(item)
    else:
        yield str(value)
        yield repr(value)


def _shown(transport: Transport) -> list[str]:
    """What a user sees of a transport (and of the one an HATransport wraps)."""
    seen = [repr(transport), str(transport), *_leaves(transport.statistics())]
    inner: Any = getattr(transport, "inner", None)
    if inner is not None:
        seen += [repr(inner), str(inner), *_leaves(inner.statistics())]
    return seen


def _error_texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


async def _failure(make: Callable[[], Transport]) -> list[str]:
    """Connect a transport whose secret is wrong: it must fail; the texts of its error."""
    transport = make()
    try:
        async with asyncio.timeout(60):  # far beyond an answer: only a retry loop gets there
            await transport.connect()
    except LoomHAError as exc:
        return _error_texts(exc)
    finally:
        await transport.disconnect()
    raise AssertionError(f"{transport!r} connected with a wrong secret")


def _status(url: str) -> str:
    """`loom-ha status URL`: its exit code, stdout and stderr."""
    program = "import sys; from loom_ha.cli import main; sys.exit(main())"
    run = subprocess.run(
        [sys.executable, "-c", program, "status", url, "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"


async def test_no_secret_shows_anywhere(
    server_launcher: ServerLauncher, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis (ACL user, Sentinel password), NATS (password, token) and Consul (ACL token)
    secrets: used, refused once, and then in no log, error, repr, statistics, metric or
    `loom-ha status` output."""
    caplog.set_level(logging.DEBUG)
    cluster = RedisSentinelCluster(
        replicas=1,
        username="admin",
        password="admin-pw",
        sentinel_password=SENTINEL_PW,
        extra_config=[acl_user("app", REDIS_PW)],
    )
    cluster = await asyncio.to_thread(server_launcher.start, cluster)
    users = NatsServer(jetstream=True, user="loom", password=NATS_PW)
    users = await asyncio.to_thread(server_launcher.start, users)
    tokens = await asyncio.to_thread(server_launcher.start, NatsServer(token=NATS_TOKEN))
    consul = await asyncio.to_thread(server_launcher.start, ConsulAgent(acl=True))
    consul_token = consul.management_token
    assert consul_token is not None
    secrets = [MARK, consul_token]

    def redis_url(password: str = REDIS_PW, sentinel: str = SENTINEL_PW, mode: str = "") -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in cluster.sentinel_addresses)
        query = f"sentinel_password={quote(sentinel, safe='')}" + (f"&mode={mode}" if mode else "")
        creds = f"app:{quote(password, safe='')}"
        return f"redis+sentinel://{creds}@{hosts}/{cluster.master_name}?{query}"

    master = await asyncio.to_thread(cluster.master)
    redis_direct = f"redis://app:{quote(REDIS_PW, safe='')}@{master.host}:{master.port}/0"
    nats_users = f"nats://loom:{quote(NATS_PW, safe='')}@{users.host}:{users.port}"
    assert tokens.url == f"nats://{NATS_TOKEN}@{tokens.host}:{tokens.port}"
    working: dict[str, Transport] = {
        "redis-streams": create_transport(redis_url(mode="streams")),
        "redis-pubsub": RedisPubSubTransport(redis_url()),
        "nats-jetstream": create_transport(nats_users),
        "nats-core": create_transport(f"{tokens.url}?mode=core"),
    }
    texts: list[str] = []
    for name, transport in working.items():
        got = Collector()
        await transport.connect()
        await transport.subscribe(f"secrets/{name}", got)
        await transport.publish(f"secrets/{name}", CloudEvent.create(source="/s", type="t"))
        await got.wait_for(1)
        texts += _shown(transport)
    registry = CollectorRegistry()
    registry.register(TransportMetrics(working))
    texts.append(generate_latest(registry).decode())

    failing: list[Callable[[], Transport]] = [
        lambda: create_transport(redis_url(password=WRONG)),
        lambda: create_transport(redis_url(sentinel=WRONG)),
        lambda: RedisPubSubTransport(redis_url(password=WRONG)),
        lambda: create_transport(f"nats://loom:{WRONG}@{users.host}:{users.port}"),
        lambda: create_transport(f"nats://{WRONG}@{tokens.host}:{tokens.port}?mode=core"),
    ]
    for make in failing:
        texts += await _failure(make)

    instance = ServiceInstance(service="secrets", instance_id="one", address="10.0.0.1:1")
    for url in (f"consul://{consul_token}@{consul.address}", redis_direct):
        async with open_registry(url, ttl=5.0) as reg:
            await reg.register(instance)
            texts += [repr(reg), str(reg)]
            texts.append(await asyncio.to_thread(_status, url))
    for url in (
        f"consul://{WRONG}@{consul.address}",
        redis_direct.replace(quote(REDIS_PW, safe=""), WRONG),
    ):
        texts.append(await asyncio.to_thread(_status, url))
    for transport in working.values():
        await transport.disconnect()
    texts += [caplog.text, *(record.getMessage() for record in caplog.records)]

    leaks = [(secret, text) for text in texts for secret in secrets if secret in text]
    assert not leaks, "\n\n".join(f"{secret!r} in: {text[:2000]}" for secret, text in leaks[:5])


async def test_a_redis_registry_hides_its_password(server_launcher: ServerLauncher) -> None:
    """A Redis registry refused by the server: one non-retryable error, and neither it nor the
    endpoint shows the password of its URL."""
    server = await asyncio.to_thread(server_launcher.redis, username="app", password=REDIS_PW)
    url = f"redis://app:{quote(WRONG, safe='')}@{server.host}:{server.port}/0"
    registry = open_registry(url, ttl=5.0)
    instance = ServiceInstance(service="secrets", instance_id="one", address="10.0.0.1:1")
    with pytest.raises(LoomHAError) as info:
        async with registry:
            await registry.register(instance)
    texts = [*_error_texts(info.value), registry.endpoint, repr(registry)]
    assert not [text for text in texts if MARK in text]
    assert isinstance(info.value, RegistryError) and not isinstance(info.value, TransientError)
