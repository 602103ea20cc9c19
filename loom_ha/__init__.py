"""loom-ha: high-availability messaging for Loom agents and any CloudEvents app.

Importing this package never imports a broker client: `loom_ha.redis`,
`loom_ha.nats` and `loom_ha.discovery` load theirs when used.
"""

# The one place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic]).
__version__ = "0.1.0"

from loom_ha.deadletter import DeadLetter
from loom_ha.errors import (
    ConfigurationError,
    ConnectionLostError,
    FailoverExhaustedError,
    LoomHAError,
    NodeError,
    NoHealthyInstanceError,
    NotConnectedError,
    PublishError,
    RegistryError,
    RegistryUnavailableError,
    SerializationError,
    TransientError,
    TransportClosedError,
    TransportError,
    UnsupportedCapabilityError,
)
from loom_ha.event import CloudEvent, EventCodec
from loom_ha.memory import InMemoryTransport
from loom_ha.policy import DeliveryPolicy
from loom_ha.retry import RetryPolicy
from loom_ha.transport import (
    Capabilities,
    Handler,
    Transport,
    TransportState,
    TransportStatistics,
    loom_request_groups,
)

__all__ = [
    "Capabilities",
    "CloudEvent",
    "ConfigurationError",
    "ConnectionLostError",
    "DeadLetter",
    "DeliveryPolicy",
    "EventCodec",
    "FailoverExhaustedError",
    "Handler",
    "InMemoryTransport",
    "LoomHAError",
    "NoHealthyInstanceError",
    "NodeError",
    "NotConnectedError",
    "PublishError",
    "RegistryError",
    "RegistryUnavailableError",
    "RetryPolicy",
    "SerializationError",
    "TransientError",
    "Transport",
    "TransportClosedError",
    "TransportError",
    "TransportState",
    "TransportStatistics",
    "UnsupportedCapabilityError",
    "loom_request_groups",
]
