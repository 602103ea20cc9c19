"""What a transport backend builds on: the public home of the delivery core.

Third-party backends (see docs/implementing-a-transport.md) import these names from here;
the modules behind them are private and may move.
"""

from __future__ import annotations

from loom_ha._delivery import LocalDelivery
from loom_ha._durable import DurableDelivery, Settlement
from loom_ha._handlers import (
    DeliveryCounters,
    Handler,
    HandlerTable,
    SubscriptionKey,
    invoke,
    raise_swallowed_cancellation,
)
from loom_ha._state import StateCell, StateListener
from loom_ha._tasks import TaskSupervisor

__all__ = [
    "DeliveryCounters",
    "DurableDelivery",
    "Handler",
    "HandlerTable",
    "LocalDelivery",
    "Settlement",
    "StateCell",
    "StateListener",
    "SubscriptionKey",
    "TaskSupervisor",
    "invoke",
    "raise_swallowed_cancellation",
]
