"""Every exception loom-ha raises, in one hierarchy.

    LoomHAError
    ├── TransportError
    │   ├── NotConnectedError         publish/subscribe before connect()
    │   ├── TransportClosedError      we closed it: never retried
    │   ├── ConnectionLostError       peer or network: transient, retried
    │   ├── PublishError              .topic, .event_id
    │   └── FailoverExhaustedError    .attempts; __cause__ is the last error
    ├── RegistryError
    │   ├── RegistryUnavailableError  transient, retried
    │   └── NoHealthyInstanceError    also LookupError
    ├── SerializationError            also ValueError; .reason says what is wrong
    ├── UnsupportedCapabilityError    also NotImplementedError
    ├── ConfigurationError            also ValueError; names the bad option
    └── NodeError                     also RuntimeError; a Loom node's node.error reply

`TransientError` is a mixin: it is the only thing retry logic ever catches.
"""

from __future__ import annotations


class LoomHAError(Exception):
    """Base class of every loom-ha error."""


class TransientError:
    """Mixin for errors that may succeed when retried (the broker may come back)."""


class TransportError(LoomHAError):
    """A transport could not do what was asked."""


class NotConnectedError(TransportError):
    """The transport is not connected: call `await transport.connect()` first."""


class TransportClosedError(TransportError):
    """The transport was closed by its owner; it will not reconnect."""


class ConnectionLostError(TransportError, TransientError):
    """The broker went away (network, crash, failover); retrying may succeed."""


class PublishError(TransportError):
    """A publish was not accepted by the broker."""

    def __init__(self, message: str, *, topic: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.event_id = event_id


class FailoverExhaustedError(TransportError):
    """Every endpoint was tried `attempts` times without success."""

    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class RegistryError(LoomHAError):
    """A service registry could not do what was asked."""


class RegistryUnavailableError(RegistryError, TransientError):
    """The registry (Consul, Redis) cannot be reached right now."""


class NoHealthyInstanceError(RegistryError, LookupError):
    """No passing instance of the requested service is known."""


class SerializationError(LoomHAError, ValueError):
    """Bytes are not a valid CloudEvent (or an event cannot be encoded).

    `reason` is a short, human-readable statement of what is wrong; it is
    what dead-letter records carry.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedCapabilityError(LoomHAError, NotImplementedError):
    """The backend does not support what was asked (see its `capabilities`)."""


class ConfigurationError(LoomHAError, ValueError):
    """A URL or option is invalid; the message names the offending part."""


class NodeError(LoomHAError, RuntimeError):
    """A Loom node failed the request: it answered with ``node.error`` (`HALoomApp.run`).

    The message is the node's own (``data["error"]``, the ``str()`` of what its handler
    raised). `target` is the node asked, `source` the node that answered (its URI),
    `request_id` the request's event id. Fix the node, or catch this to fall back.
    """

    def __init__(self, message: str, *, target: str, request_id: str, source: str) -> None:
        super().__init__(message)
        self.error = message
        self.target = target
        self.request_id = request_id
        self.source = source
