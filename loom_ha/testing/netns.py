"""Real network partitions for tests: members in Linux network namespaces joined by one switch.

Each `Member` is a network namespace with one private address; the test process itself is the
`Network.host` member. Every member's link ends on a bridge in a "switch" namespace;
`partition()` moves links onto separate bridges, so traffic between groups is dropped silently
(as behind a failed switch: no reset, no error), and `heal()` puts them back. Needs root.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, TypeVar

from ._iproute import (
    GUARD_METRIC,
    PREFIX,
    NetworkError,
    free_subnet,
    ip,
    ip_batch,
    netns_exec,
    require_root,
    run_in_netns,
    sweep,
    sweep_once,
)
from ._net import LOCALHOST

__all__ = ["Member", "Network", "NetworkError", "Placement", "sweep"]

T = TypeVar("T")

_MAIN_BRIDGE = "br0"
_MAX_MEMBERS = 250  # a /24 less the network, broadcast and the host's own addresses
_RESERVED = ("host", "switch")
_MEMBER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")  # it ends a namespace name
_seq = itertools.count(1)


@dataclass(frozen=True)
class Placement:
    """Where a server runs: the address it binds and its network namespace (None: ours)."""

    host: str = LOCALHOST
    netns: str | None = None

    def command(self, argv: list[str]) -> list[str]:
        """`argv`, run inside `netns` when one is set."""
        return argv if self.netns is None else netns_exec(self.netns, argv)


@dataclass(eq=False)
class Member:
    """One machine of the test network: a namespace (None: the test process) and an address."""

    name: str
    netns: str | None
    address: str
    port: str
    """Its link's end on the switch (moved between bridges by `Network.partition()`)."""
    network: Network = field(repr=False)

    @property
    def placement(self) -> Placement:
        """Where a launcher runs a server on this member (`RedisServer(placement=...)`)."""
        return Placement(self.address, self.netns)

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn()` as a client on this member and return its result.

        A namespace member runs it on a fresh event loop in a thread of its own inside the
        namespace, so every socket `fn` opens lives there; `fn` must not share asyncio
        objects with the caller's loop (lists and `threading.Event`s are fine). Cancelling
        the caller cancels `fn` and waits for it. The host member awaits `fn()` right here.
        """
        if self.netns is None:
            return await fn()
        return await run_in_netns(self.netns, fn, name=f"loom_ha.netns:{self.name}")


class _Launcher(Protocol):
    def start(self) -> object: ...
    def stop(self) -> None: ...


_L = TypeVar("_L", bound=_Launcher)


class Network:
    """A private 10.x.y.0/24 over namespaces this process creates; the test process is `host`.

    `start()` makes the switch and links this process to it, `add()` makes members,
    `partition()` / `heal()` cut and restore links, and `stop()` stops every server started by
    `serve()`, then deletes every namespace, link and route it made (after a failure too).
    Names carry this process's pid, so concurrent runs never meet; `start()` first sweeps what
    killed runs left (`sweep()`). A guard route (`unreachable <subnet>`, removed last) keeps
    packets for the subnet from ever taking this machine's default route.

    Methods block (a few `ip` commands each, milliseconds); `serve()` blocks until the servers
    are ready: call it via `asyncio.to_thread` from async code.
    """

    def __init__(self) -> None:
        number = next(_seq)
        self.id = f"{os.getpid()}-{number}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.members: list[Member] = []
        self._switch = f"{PREFIX}-{self.id}-switch"
        self._host_link = f"lh{os.getpid():x}-{number}"
        self._guard: list[str] = []
        self._bridges: dict[str, str] = {}  # switch port -> the bridge it is on now
        self._servers: list[_Launcher] = []
        self._started = False

    @property
    def host(self) -> Member:
        """The test process's own member (its link into the switch)."""
        if not self.members:
            raise NetworkError("Network.host before start()")
        return self.members[0]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this network made (the switch's included)."""
        made = [m.netns for m in self.members if m.netns]
        return [*made, self._switch] if self._started else made

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Create the switch and the host member. Idempotent.

        Raises:
            NetworkError: not root, no `ip`, or a command failed (what was made is removed).
        """
        if self._started:
            return self
        require_root()
        sweep_once()
        self._started = True
        try:
            self.subnet = free_subnet()
            ip("netns", "add", self._switch)
            ip("link", "set", "lo", "up", netns=self._switch)
            self._add_bridge(_MAIN_BRIDGE)
            ip("link", "add", self._host_link, "type", "veth", "peer", "name", "p0")
            ip("link", "set", "p0", "netns", self._switch)
            self._plug("p0")
            address = self._address(0)
            ip("addr", "add", f"{address}/24", "dev", self._host_link)
            ip("link", "set", self._host_link, "up")
            metric = str(GUARD_METRIC + os.getpid())
            self._guard = ["unreachable", str(self.subnet), "metric", metric]
            ip("route", "add", *self._guard)
            self.members.append(Member("host", None, address, "p0", self))
        except BaseException:
            self.stop()
            raise
        return self

    def add(self, name: str) -> Member:
        """A new member: a namespace linked to the switch, with the next free address.

        Raises:
            ValueError: `name` is taken, reserved, or not 1-24 of [a-z0-9-].
            NetworkError: before `start()`, or a command failed.
        """
        if not self._started:
            raise NetworkError("Network.add() before start()")
        if not _MEMBER_NAME.match(name) or name in _RESERVED:
            raise ValueError(f"member name {name!r}: 1-24 of [a-z0-9-], not host or switch")
        if any(m.name == name for m in self.members):
            raise ValueError(f"member name {name!r} is already used in this network")
        index = len(self.members)
        if index > _MAX_MEMBERS:
            raise ValueError(f"a Network holds at most {_MAX_MEMBERS} members")
        netns, port, address = f"{PREFIX}-{self.id}-{name}", f"p{index}", self._address(index)
        ip("netns", "add", netns)
        self.members.append(Member(name, netns, address, port, self))
        ip("link", "set", "lo", "up", netns=netns)
        peer = ("peer", "name", "eth0", "netns", netns)
        ip("link", "add", port, "type", "veth", *peer, netns=self._switch)
        self._plug(port)
        ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
        ip("link", "set", "eth0", "up", netns=netns)
        return self.members[-1]

    def serve(self, launcher: _L) -> _L:
        """Start `launcher` (its servers placed on members); `stop()` stops it first."""
        self._servers.append(launcher)
        launcher.start()
        return launcher

    def stop(self) -> None:
        """Stop served launchers, then delete every namespace, link and route. Idempotent.

        Raises:
            NetworkError: something could not be removed (everything else still was).
        """
        errors: list[str] = []
        while self._servers:
            server = self._servers.pop()
            try:
                server.stop()
            except Exception as exc:
                errors.append(f"stopping {server!r}: {exc}")
        if self._started:
            # The host link first: a deleted namespace takes its links down asynchronously,
            # and until then this process would still route the subnet to them.
            steps = [["link", "delete", self._host_link]]
            steps += [["netns", "delete", netns] for netns in self.namespaces]
            if self._guard:
                steps.append(["route", "delete", *self._guard])
            for step in steps:
                try:
                    ip(*step)
                except NetworkError as exc:
                    if "Cannot find" not in str(exc) and "No such" not in str(exc):
                        errors.append(str(exc))
            self._started = False
            self._guard = []
            self._bridges.clear()
            self.members.clear()
        if errors:
            raise NetworkError("network teardown incomplete: " + "; ".join(errors))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------------

    def partition(self, *groups: Iterable[Member]) -> None:
        """Cut the network: each group reaches only its own members; members named in no
        group stay together as one more group. Replaces any earlier partition.

        Packets between groups are dropped without a trace (no RST, no ICMP): open TCP
        connections stall and retransmit, new ones time out, as behind a failed switch.

        Raises:
            ValueError: a member is named twice or belongs to another network.
        """
        wanted = {m.port: _MAIN_BRIDGE for m in self.members}
        seen: set[str] = set()
        for index, group in enumerate(groups, start=1):
            for member in group:
                if member.network is not self or member not in self.members:
                    raise ValueError(f"{member.name!r} is not a member of this network")
                if member.name in seen:
                    raise ValueError(f"{member.name!r} is named in two groups")
                seen.add(member.name)
                wanted[member.port] = f"g{index}"
        self._move(wanted)

    def isolate(self, *members: Member) -> None:
        """`partition(members)`: these members together, cut off from everyone else."""
        self.partition(members)

    def heal(self) -> None:
        """Reconnect every member: one switch again; open TCP connections resume."""
        self._move({m.port: _MAIN_BRIDGE for m in self.members})

    def connected(self, a: Member, b: Member) -> bool:
        """True when `a` and `b` are on the same side of the current partition."""
        return self._bridges.get(a.port) == self._bridges.get(b.port)

    # -- internals -------------------------------------------------------------------------------

    def _address(self, index: int) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + index + 1)

    def _add_bridge(self, bridge: str) -> None:
        ip("link", "add", bridge, "type", "bridge", netns=self._switch)
        ip("link", "set", bridge, "up", netns=self._switch)

    def _plug(self, port: str, bridge: str = _MAIN_BRIDGE) -> None:
        ip("link", "set", port, "master", bridge, "up", netns=self._switch)
        self._bridges[port] = bridge

    def _move(self, wanted: dict[str, str]) -> None:
        """Plug every port into its wanted bridge in one `ip -batch` (one step for clients)."""
        existing = set(self._bridges.values())
        moves = {p: b for p, b in wanted.items() if self._bridges.get(p) != b}
        commands = []
        for bridge in sorted(set(wanted.values()) - existing):
            commands += [f"link add {bridge} type bridge", f"link set {bridge} up"]
        commands += [f"link set {port} master {bridge} up" for port, bridge in moves.items()]
        unused = sorted(existing - set(wanted.values()) - {_MAIN_BRIDGE})
        commands += [f"link delete {bridge}" for bridge in unused]
        ip_batch(commands, netns=self._switch)
        self._bridges.update(moves)
