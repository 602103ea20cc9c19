"""Prometheus metrics read from transports' `statistics()` at scrape time.

Nothing is counted twice: transports keep their own counters, and this collector
turns a snapshot of them into Prometheus families when scraped::

    from prometheus_client import REGISTRY, start_http_server
    REGISTRY.register(TransportMetrics({"main": transport}))
    start_http_server(9108)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loom_ha.transport import Transport, TransportState

Rows = tuple[tuple[str, str], ...]  # (statistics field, help text)

_COUNTERS: Rows = (
    ("published", "Events handed to the broker"),
    ("delivered", "Events a handler finished without error"),
    ("handler_errors", "Handler calls that raised"),
    ("redelivered", "Events the broker delivered again"),
    ("dead_lettered", "Events moved to the dead-letter place"),
    ("malformed", "Messages that were not valid CloudEvents"),
    ("duplicates_dropped", "Events a dedup window kept from a handler"),
    ("reconnects", "Times the connection to the broker was re-established"),
    ("outbox_dropped", "Events a full drop_oldest outbox discarded"),
)
_GAUGES: Rows = (
    ("outbox_depth", "Publishes waiting for the broker"),
    ("queued", "Events waiting for a handler in this process"),
    ("subscriptions", "Live subscriptions"),
)


# Request routing (`BalancedTransport`), read from `statistics().extra` when present.
_ROUTING_COUNTERS: Rows = (
    ("routed", "Requests sent to an instance the balancer chose"),
    ("unrouted", "Requests sent to the broker group (no instance registered)"),
    ("retries", "Request attempts repeated on another instance"),
    ("attempt_timeouts", "Request attempts that got no reply in time"),
    ("abandoned", "Requests whose retry budget ran out"),
)
_ROUTING_GAUGES: Rows = (("in_flight", "Requests of this process waiting for a reply"),)


class TransportMetrics(Collector):
    """A Prometheus collector for named transports (label ``transport``)."""

    def __init__(self, transports: Mapping[str, Transport] | None = None) -> None:
        self._transports: dict[str, Transport] = dict(transports or {})

    def add(self, name: str, transport: Transport) -> None:
        """Start exporting `transport` under `name`."""
        self._transports[name] = transport

    def remove(self, name: str) -> None:
        """Stop exporting `name` (unknown names are ignored)."""
        self._transports.pop(name, None)

    def collect(self) -> Iterator[Metric]:
        """Yield one family per figure, with a sample per transport."""
        snapshots = {name: t.statistics() for name, t in self._transports.items()}
        families = ((CounterMetricFamily, _COUNTERS), (GaugeMetricFamily, _GAUGES))
        for family_type, rows in families:
            for field, doc in rows:
                family = family_type(f"loom_ha_{field}", doc, labels=["transport", "backend"])
                for name, stats in snapshots.items():
                    family.add_metric([name, stats.backend], getattr(stats, field))
                yield family
        routing = {n: s.extra for n, s in snapshots.items() if s.extra and "routed" in s.extra}
        families = ((CounterMetricFamily, _ROUTING_COUNTERS), (GaugeMetricFamily, _ROUTING_GAUGES))
        for family_type, rows in families:
            for field, doc in rows:
                family = family_type(f"loom_ha_requests_{field}", doc, labels=["transport"])
                for name, extra in routing.items():
                    family.add_metric([name], extra[field])
                yield family
        ejected = GaugeMetricFamily(
            "loom_ha_ejected",
            "1 while the balancer ejects the instance",
            labels=["transport", "instance"],
        )
        for name, extra in routing.items():
            for instance in extra.get("ejected", ()):
                ejected.add_metric([name, instance], 1.0)
        yield ejected
        state = GaugeMetricFamily(
            "loom_ha_state", "1 for the transport's current state", labels=["transport", "state"]
        )
        for name, stats in snapshots.items():
            for candidate in TransportState:
                state.add_metric([name, candidate.value], float(stats.state is candidate))
        yield state
