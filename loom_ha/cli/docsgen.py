"""Generates docs/delivery-guarantees.md from the capabilities the backends declare.

Run ``python -m loom_ha.cli.docsgen > docs/delivery-guarantees.md``; a test fails when
the committed file and the declared capabilities disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom_ha.transport import Capabilities


@dataclass(frozen=True)
class Row:
    """One transport and mode, with the chaos tests that back its claims."""

    transport: str
    mode: str
    capabilities: Capabilities
    broker_kill_test: str


def rows() -> list[Row]:
    """Every backend, imported lazily (each needs its client library)."""
    from loom_ha.memory import InMemoryTransport
    from loom_ha.nats import JetStreamTransport, NatsCoreTransport
    from loom_ha.redis import RedisPubSubTransport, RedisStreamsTransport

    return [
        Row("memory", "-", InMemoryTransport.capabilities, "(no broker)"),
        Row("redis", "pubsub", RedisPubSubTransport.capabilities,
            "tests/redis/test_chaos.py (pubsub master kill: loss window measured)"),
        Row("redis", "streams", RedisStreamsTransport.capabilities,
            "tests/redis/test_chaos.py, tests/ha/test_chaos_ha.py (master SIGKILL: 0 lost)"),
        Row("nats", "core", NatsCoreTransport.capabilities,
            "tests/nats/test_chaos.py (core node kill: loss window measured)"),
        Row("nats", "jetstream", JetStreamTransport.capabilities,
            "tests/nats/test_chaos.py, tests/ha/test_chaos_ha.py (node SIGKILL: 0 lost)"),
    ]  # fmt: skip


@dataclass(frozen=True)
class Fault:
    """A fault beyond a clean kill, what it costs, and the test that measures it."""

    transport: str
    mode: str
    fault: str
    lost: str
    duplicated: str
    stall: str
    backed_by: str


def faults() -> list[Fault]:
    """Faults users hit more often than a SIGKILL (a backend's rows sit together)."""
    return [
        Fault("redis", "streams",
              "master frozen (SIGSTOP, sockets open), Sentinel fails over, the old master "
              "resumes still master (split-brain) until demoted",
              "no (appends it ran on resume were re-sent; `wait_replicas` keeps it from "
              "confirming any)",
              "at the transport: possible (re-sent appends); seen by handlers with "
              "HATransport: no",
              "≤ down-after + 3 s (asserted); the silent master is given up within "
              "`socket_timeout` (2 s)",
              "tests/redis/test_freeze.py"),
        Fault("redis", "pubsub",
              "master frozen, Sentinel fails over, the old master resumes (split-brain)",
              "yes: the publish in flight and those while subscribers move (measured, not "
              "zero)",
              "no", "≤ down-after + 3 s (asserted)", "tests/redis/test_freeze.py"),
        Fault("redis", "both",
              "server, or Sentinel master, frozen without a failover; a sentinel frozen",
              "streams: no; pubsub: while the listener is away",
              "streams: not seen by handlers with HATransport; pubsub: no",
              "declared dead ≤ `socket_timeout` (2 s) on idle, blocked and listening "
              "connections; back once it answers",
              "tests/redis/test_silence.py"),
        Fault("redis", "any",
              "writes of *other* clients still connected to a returning old master "
              "(split-brain)",
              "yes, all of them at its demotion; none is confirmed by `WAIT`", "no", "-",
              "tests/redis/test_freeze.py (counted)"),
        Fault("nats", "jetstream",
              "node the client is connected to frozen (SIGSTOP, sockets open; the stream "
              "leader elsewhere)",
              "no", "at the transport: possible (re-sent publishes, redeliveries); seen by "
              "handlers with HATransport: no",
              "≤ 3 s (asserted); declared dead ≤ `ping_interval * (max_outstanding_pings + "
              "1)` (2 s), then reconnected to another node",
              "tests/nats/test_freeze.py"),
        Fault("nats", "jetstream", "stream leader frozen",
              "no", "at the transport: possible; seen by handlers with HATransport: no",
              "the raft election (4-9 s, measured) + ≤ 2.5 s (asserted)",
              "tests/nats/test_freeze.py"),
        Fault("nats", "jetstream",
              "a publish retried while its first attempt is still being stored (409 / "
              "10158 \"duplicate message id is in process\")",
              "no (confirmed by re-publishing with the same message id, never raised)",
              "no (stored once)", "until the stream stores the first attempt",
              "tests/nats/test_freeze.py"),
        Fault("nats", "core", "node publisher and subscriber are connected to frozen",
              "yes: what was in flight (measured, not zero)", "no",
              "declared dead ≤ 2 s; delivery resumes while the node is still frozen",
              "tests/nats/test_freeze.py (loss window measured)"),
        Fault("nats", "both", "the only server frozen, idle or under load",
              "core: what was in flight; jetstream: no", "no",
              "declared dead ≤ 2 s; `disconnect()` returns while it is frozen",
              "tests/nats/test_liveness.py"),
        Fault("consul", "registry", "the agent the registry talks to frozen 10 s",
              "no: heartbeats resume on SIGCONT; `instances()` serves the last snapshot",
              "no",
              "a blocking query is given up after `watch_wait + watch_wait/16 + timeout` "
              "(watch stale after 2.1 s measured, fresh 0.02 s after resume)",
              "tests/discovery/test_chaos.py (frozen agent)"),
        Fault("consul", "registry",
              "Consul leader of 3 frozen 5-8 s; registries on a client agent",
              "no registration; one that raised (`RegistryUnavailableError`) and reached the "
              "agent later is removed by the next heartbeat round (3-5 per run)",
              "no",
              "a registration wedges the client agent until the leader answers (Consul 1.8 "
              "holds its state lock across the catalog RPC): registrations and heartbeats "
              "time out meanwhile; instances with a TTL longer than that never leave the "
              "passing set, a 2 s TTL drops for 10-40 ms at the end; new leader 2.5-3.9 s, "
              "watch stale 0.4-4.7 s (measured)",
              "tests/discovery/test_consul_freeze.py"),
    ]  # fmt: skip


def partitions() -> list[Fault]:
    """Network partitions (real ones: Linux namespaces, links cut), per broker and side."""
    test = "tests/partition/test_{}_partition.py".format
    return [
        Fault("redis", "streams",
              "master + a publishing client cut off from the sentinels, replicas and "
              "consumers; `wait_replicas=1` (the Sentinel default)",
              "no: a publish returns once `WAIT` saw a replica, which the cut-off master "
              "has none of; it is retried until the client reaches the new master",
              "no (measured 0)",
              "the client's publishes stall for the partition (measured 6.2-7.5 s: 2.5-3.1 s "
              "to promote, 3 s held, 0.2-1.5 s to move after the heal)",
              test("redis")),
        Fault("redis", "streams",
              "the same with `wait_replicas=0`",
              "yes: every publish the cut-off master accepted (measured 875-1168 per run, "
              "all but the one in flight at the cut)",
              "no", "none: the client keeps writing to the old master, and moves 0.1-1 s "
              "after the heal (the sentinels name another master)", test("redis")),
        Fault("nats", "jetstream",
              "one node of 3 cut off; clients on the majority side were connected to it",
              "no (measured 0)", "no (measured 0)",
              "the client gives the silent node up within `detection_time` (2 s) and "
              "moves; publish stall ≤ 3 s (asserted; measured 1.6-1.8 s)",
              test("nats")),
        Fault("nats", "jetstream",
              "a client on the minority side, next to the cut-off node",
              "no: no acknowledgement while cut off (the stream's quorum is across); "
              "re-sent with the same Msg-Id after the heal",
              "no (measured 0)",
              "its publishes stall for the partition and ~3 s more (6.9-7.0 s for a 4 s "
              "cut)",
              test("nats")),
        Fault("nats", "core",
              "published on the minority side during a 4 s cut",
              "none here: the route's TCP connection held them until the heal (0 of "
              "662-713); "
              "a cut that outlasts the route (its PINGs: 2 min x 2) or its buffers loses "
              "them (at-most-once)",
              "no", "-", test("nats")),
        Fault("consul", "registry",
              "a client agent, and the instances registered through it, cut off from the "
              "3 servers",
              "no registration: every instance is passing again after the heal without "
              "being registered anew",
              "no",
              "the majority drops the instances once gossip declares the node failed "
              "(measured 5.7-6.1 s); back 18-32 s after the heal (serf retries failed "
              "members every 30 s); the cut-off side's watch is stale after 2 s",
              test("consul")),
    ]  # fmt: skip


def _fault_row(fault: Fault) -> str:
    return (
        f"| {fault.transport} | {fault.mode} | {fault.fault} | {fault.lost} "
        f"| {fault.duplicated} | {fault.stall} | {fault.backed_by} |"
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render() -> str:
    """The whole Markdown page."""
    out = [
        "# Delivery guarantees",
        "",
        "Generated by `python -m loom_ha.cli.docsgen` from each backend's declared `capabilities`",
        '(a test keeps this page and the code in agreement). "With HATransport" means the',
        "backend wrapped by `HATransport` with its default dedup window and BLOCK outbox.",
        "",
        "| transport | mode | broker node killed: lost? | duplicated? | ordered? | "
        "subscriber away: kept? | backed by |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows():
        caps = row.capabilities
        if row.transport == "memory":
            lost = "n/a (in process)"
        elif caps.at_least_once and caps.persistent:
            lost = "no"
        else:
            lost = "yes, during the failover window (measured, not zero)"
        duplicated = (
            "at the transport: possible (redelivery); seen by handlers with HATransport: no"
            if caps.at_least_once
            else "no"
        )
        ordered = "per publisher and topic" if caps.ordered else "no"
        if caps.at_least_once and caps.ordered:
            ordered += " (a redelivery can arrive later)"
        kept = "yes (groups and durable consumers)" if caps.persistent else "no"
        out.append(
            f"| {row.transport} | {row.mode} | {lost} | {duplicated} | {ordered} | {kept} "
            f"| {row.broker_kill_test} |"
        )
    out += [
        "",
        "## Beyond a clean kill",
        "",
        "Faults users hit more often than a SIGKILL: a broker that stops answering but",
        "keeps its sockets open, split-brain. Each row's test counts every event.",
        "",
        "| transport | mode | fault | lost? | duplicated? | stall / detection | backed by |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    out += [_fault_row(fault) for fault in faults()]
    out += [
        "",
        "## Partitions",
        "",
        "Real network partitions: brokers and clients in Linux network namespaces, links cut",
        "with `loom_ha.testing.netns` ([partition tests](operations.md#partition-tests)). Each",
        "test counts every event and prints sent / received / lost / duplicated / stall.",
        "",
        "| transport | mode | partition | lost? | duplicated? | stall / detection | backed by |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    out += [_fault_row(fault) for fault in partitions()]
    out += [
        "",
        "## Declared capabilities",
        "",
        "| transport | mode | " + " | ".join(_capability_names()) + " |",
        "| --- | --- | " + " | ".join("---" for _ in _capability_names()) + " |",
    ]
    for row in rows():
        flags = " | ".join(_yes(getattr(row.capabilities, n)) for n in _capability_names())
        out.append(f"| {row.transport} | {row.mode} | {flags} |")
    out += [
        "",
        "Publishing while the broker is away: every backend under `HATransport` queues the",
        "event in a bounded outbox (BLOCK waits, FAIL_FAST raises a retryable error,",
        "DROP_OLDEST drops and counts), and replays it with the same CloudEvent id",
        "(tests/ha/test_chaos_ha.py).",
        "",
    ]
    return "\n".join(out)


def _capability_names() -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(Capabilities)]


if __name__ == "__main__":
    print(render(), end="")
