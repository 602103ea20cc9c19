"""Glue for loom-agent 0.3.4: a transport for LoomApp, deterministic start-up, a fixed `run()`.

Loom nodes subscribe to their request topic from a task started in `Node.__init__`
and nobody awaits it, so a request sent right away can reach no one. `start_nodes`
awaits the app's start and every node's subscription before returning. `HALoomApp`
(from `loom_ha.loom_app`, loaded on first access) is a `LoomApp` whose `run()` removes
its reply handlers and raises a node's error. Importing this module never imports loom.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loom_ha.loom_app import HALoomApp

__all__ = ["HALoomApp", "loom_transport", "start_nodes"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): HALoomApp subclasses loom's LoomApp, and loom is an optional extra.
    if name == "HALoomApp":
        from loom_ha.loom_app import HALoomApp

        return HALoomApp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def start_nodes(app: Any, *nodes: Any) -> None:
    """Start `app` (a `LoomApp`) and wait until every node listens for requests.

    Idempotent: a node that already subscribed is left alone.
    """
    await app.start()
    for node in nodes:
        await node._subscribe_to_events()


def loom_transport(url: str | None = None, *, env: Mapping[str, str] | None = None) -> Any:
    """A loom-ha transport for LoomApp: from `url`, else from the environment.

    Received events are built as Loom's own `CloudEvent` class, and the transport is
    registered as a virtual subclass of Loom's `Transport` ABC. With ``LOOM_HA_REGISTRY``
    set (in `env`, default ``os.environ``), requests are routed to chosen instances
    (`loom_ha.routing.BalancedTransport`).
    Close it yourself (``await transport.close()`` or ``async with``): LoomApp never
    disconnects.
    """
    from loom.interfaces.transport import Transport as LoomTransportABC
    from loom.protocol.cloudevents import CloudEvent as LoomCloudEvent

    from loom_ha.config import create_transport, transport_from_env
    from loom_ha.routing.config import balanced_from_env
    from loom_ha.transport import Transport

    LoomTransportABC.register(Transport)
    if url is None:
        return transport_from_env(env, event_class=LoomCloudEvent)
    transport = create_transport(url, event_class=LoomCloudEvent)
    return balanced_from_env(transport, env, transport_url=url)
