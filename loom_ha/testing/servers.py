"""Public entry point for the real-server launchers used by loom-ha's tests and its users' tests.

Re-exports only. Every launcher is stdlib-only (subprocess, socket, urllib), binds 127.0.0.1
on free ports, runs in its own temp dir, and is a context manager whose exit leaves no process.
"""

from __future__ import annotations

from ._net import free_port, free_ports
from ._process import (
    ServerNotReadyError,
    ServerProcess,
    find_server_binary,
    stop_all,
    wait_until,
)
from ._tls import TlsFiles, make_test_certificates
from .consul_servers import ConsulAgent, ConsulCluster
from .nats_servers import NatsCluster, NatsServer
from .redis_sentinel import RedisSentinel, RedisSentinelCluster
from .redis_servers import RedisServer

__all__ = [
    "ConsulAgent",
    "ConsulCluster",
    "NatsCluster",
    "NatsServer",
    "RedisSentinel",
    "RedisSentinelCluster",
    "RedisServer",
    "ServerNotReadyError",
    "ServerProcess",
    "TlsFiles",
    "find_server_binary",
    "free_port",
    "free_ports",
    "make_test_certificates",
    "stop_all",
    "wait_until",
]
