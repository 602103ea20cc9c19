"""Loopback networking for the server launchers: free ports, HTTP probes and a tiny RESP client.

Stdlib only, so that readiness probes never depend on the client libraries under test.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

__all__ = [
    "LOCALHOST",
    "RespError",
    "free_port",
    "free_ports",
    "http_get",
    "http_get_json",
    "http_json",
    "http_request",
    "resp_command",
]

LOCALHOST = "127.0.0.1"

RespValue = str | int | bytes | list["RespValue"] | None


def free_port(*, udp: bool = False) -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (and on UDP too if `udp`).

    The port is released before returning, so a concurrent process may still take it before
    the server binds it; see `free_ports` for why that is rare.
    """
    return free_ports(1, udp=udp)[0]


def free_ports(count: int, *, udp: bool = False) -> list[int]:
    """Return `count` distinct free ports on 127.0.0.1 (all held open until every one is picked).

    Picked below the kernel's ephemeral range (`ip_local_port_range`) where there is one:
    a port the kernel offers for ``bind(0)`` is also one it gives any outgoing connection
    (of any process) meanwhile, and a server starting slowly on a loaded machine would then
    find its port taken ("address already in use") and exit.

    Args:
        count: how many ports.
        udp: also require the same port number to be free for UDP (Consul's Serf gossip).
    """
    low, high = _listening_range()
    pick = random.Random()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        tries = 0
        while len(ports) < count:
            tries += 1
            port = pick.randint(low, high) if low and tries < 1000 else 0
            if port in ports:
                continue
            tcp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                tcp.bind((LOCALHOST, port))
            except OSError:
                continue
            port = int(tcp.getsockname()[1])
            if udp:
                probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                try:
                    probe.bind((LOCALHOST, port))
                except OSError:
                    continue  # keep the TCP socket open so this port is not offered again
            ports.append(port)
        return ports


def _listening_range() -> tuple[int, int]:
    """Ports below the ephemeral range, for servers; (0, 0) where it cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return (10_000, first - 1) if first > 12_000 else (0, 0)


# A proxy from the environment (http_proxy) must never see loopback probes.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, *, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET `url` without any proxy; return (status, body), including for 4xx/5xx answers.

    Raises:
        OSError: the server is not reachable (refused, reset, timed out).
    """
    return http_request(url, timeout=timeout)


def http_request(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 2.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """Send one HTTP request without any proxy; return (status, body), also for 4xx/5xx."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()


def http_get_json(url: str, *, timeout: float = 2.0) -> object:
    """GET `url` and decode its JSON body; raise `OSError` for non-2xx answers."""
    return http_json(url, timeout=timeout)


def http_json(
    url: str,
    *,
    method: str = "GET",
    payload: object = None,
    timeout: float = 2.0,
    headers: Mapping[str, str] | None = None,
) -> object:
    """Send `payload` as JSON (if not None) and decode the JSON answer (None when empty).

    Raises:
        OSError: unreachable, or a non-2xx answer (status and body start in the message).
    """
    body = None if payload is None else json.dumps(payload).encode()
    status, data = http_request(url, method=method, body=body, timeout=timeout, headers=headers)
    if not 200 <= status < 300:
        raise OSError(f"{method} {url} -> HTTP {status}: {data[:200]!r}")
    return json.loads(data) if data.strip() else None


class RespError(Exception):
    """The Redis server answered with an error reply (`-ERR ...`)."""


def resp_command(
    address: tuple[str, int],
    *args: str,
    auth: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 2.0,
) -> RespValue:
    """Send one command over a fresh connection and return the decoded reply.

    Args:
        address: (host, port) of a redis-server or sentinel.
        *args: the command, e.g. `"SENTINEL", "get-master-addr-by-name", "mymaster"`.
        auth: `AUTH` arguments sent first: `(password,)` or `(username, password)`.
        ssl_context: wrap the connection in TLS.
        timeout: socket timeout for connect and each read.

    Raises:
        OSError: connection failed or closed early.
        RespError: the server answered with an error.
    """
    with socket.create_connection(address, timeout=timeout) as raw:
        sock: socket.socket = raw
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(raw, server_hostname=address[0])
        with sock, sock.makefile("rb") as reader:
            if auth:
                sock.sendall(_encode(("AUTH", *auth)))
                _read_reply(reader)
            sock.sendall(_encode(args))
            return _read_reply(reader)


def _encode(args: Sequence[str]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: io.BufferedIOBase) -> RespValue:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed in the middle of a RESP reply")
    kind, payload = line[:1], line[1:-2]
    if kind == b"+":
        return payload.decode()
    if kind == b"-":
        raise RespError(payload.decode())
    if kind == b":":
        return int(payload)
    if kind == b"$":
        size = int(payload)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return data[:-2]
    if kind == b"*":
        size = int(payload)
        if size < 0:
            return None
        return [_read_reply(reader) for _ in range(size)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")
