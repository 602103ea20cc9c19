"""Instance-aware request routing: requests to one chosen instance, retried on another.

`BalancedTransport` wraps any transport and a registry; see docs/balancing.md.
"""

from __future__ import annotations

from loom_ha.routing.directory import InstanceDirectory
from loom_ha.routing.routes import LOOM_ROUTES, RequestRoutes, loom_request_id, service_name
from loom_ha.routing.transport import (
    DEFAULT_BUDGET,
    BalancedTransport,
    default_balancer,
    default_instance_id,
)

__all__ = [
    "DEFAULT_BUDGET",
    "LOOM_ROUTES",
    "BalancedTransport",
    "InstanceDirectory",
    "RequestRoutes",
    "default_balancer",
    "default_instance_id",
    "loom_request_id",
    "service_name",
]
