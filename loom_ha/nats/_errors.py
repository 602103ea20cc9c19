"""map_nats_errors(): the one place nats-py exceptions become loom-ha errors.

Lost connections, timeouts and cluster elections (no responders, 503) become the
transient `ConnectionLostError`, which retry logic may retry; bad credentials and
subjects become `ConfigurationError`; JetStream's "duplicate message id is in process"
becomes the transient `PublishInProgressError`; everything else a `TransportError` (or a
`PublishError` when a topic is given).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import nats.errors
import nats.js.errors

from loom_ha.errors import (
    ConfigurationError,
    ConnectionLostError,
    LoomHAError,
    PublishError,
    TransientError,
    TransportError,
)

MSG_ID_IN_PROCESS = 10158
"""JetStream's err_code for a publish whose ``Nats-Msg-Id`` an earlier attempt is still storing."""


class PublishInProgressError(TransportError, TransientError):
    """JetStream is still storing an earlier attempt of this publish (409, err_code 10158).

    Not a failure: the stream leader staged that attempt's message id and waits for its
    replicas. Publishing again with the same ``Nats-Msg-Id`` a moment later is answered
    ``duplicate=True`` once it is stored (or stores it, if that attempt was dropped in a
    leader change): the publish retry does exactly that, so this never reaches a caller
    except as the cause of a publish that ran out of time.
    """


# Most specific first: the first matching entry decides.
_TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,  # request/flush/fetch/drain timeouts
    nats.js.errors.NoStreamResponseError,  # stream leader election in progress
    nats.js.errors.ServiceUnavailableError,  # JetStream temporarily unavailable (503)
    nats.js.errors.TooManyStalledMsgsError,
    nats.errors.ProtocolError,
    nats.errors.UnexpectedEOF,
    OSError,
    asyncio.TimeoutError,
)
_CONFIGURATION: tuple[type[BaseException], ...] = (
    nats.errors.AuthorizationError,
    nats.errors.InvalidUserCredentialsError,
    nats.errors.SecureConnRequiredError,
    nats.errors.SecureConnWantedError,
    nats.errors.SecureConnFailedError,
    nats.errors.BadSubjectError,
    nats.errors.BadTimeoutError,
    nats.errors.InvalidCallbackTypeError,
    nats.errors.BadHeaderError,
)


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc) or getattr(exc, "description", None) or ""
    except Exception:  # some nats-py errors format attributes they may lack
        text = getattr(exc, "description", None) or ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def translate(
    exc: BaseException, *, topic: str | None = None, event_id: str | None = None, what: str = "nats"
) -> BaseException:
    """The loom-ha error for nats-py's `exc` (its ``__cause__``), or `exc` itself when it is
    not a nats-py error: what `map_nats_errors` raises, for a caller holding the exception
    (a failed ack future, an ``except`` that maps only on failure to spare the hot path).

    Args:
        topic: set when publishing: non-transient failures become `PublishError`.
        event_id: the event being published, for `PublishError`.
        what: names the operation in messages.
    """
    mapped: BaseException
    if isinstance(exc, LoomHAError):
        return exc
    if isinstance(exc, _TRANSIENT):
        mapped = ConnectionLostError(f"{what}: {_describe(exc)}")
    elif isinstance(exc, _CONFIGURATION):
        mapped = ConfigurationError(
            f"{what}: {_describe(exc)} (check servers, credentials and TLS options)"
        )
    elif isinstance(exc, nats.errors.Error):
        if getattr(exc, "err_code", None) == MSG_ID_IN_PROCESS:  # a 409 APIError
            mapped = PublishInProgressError(f"{what}: {_describe(exc)}")
        elif topic is not None:
            mapped = PublishError(f"{what}: {_describe(exc)}", topic=topic, event_id=event_id)
        else:
            mapped = TransportError(f"{what}: {_describe(exc)}")
    else:
        return exc
    mapped.__cause__ = exc
    return mapped


@contextmanager
def map_nats_errors(
    *, topic: str | None = None, event_id: str | None = None, what: str = "nats"
) -> Iterator[None]:
    """Translate nats-py errors raised inside the block (``raise ... from exc``).

    Args:
        topic: set when publishing: non-transient failures become `PublishError`.
        event_id: the event being published, for `PublishError`.
        what: names the operation in messages.

    Raises:
        ConnectionLostError: the connection or the cluster is (temporarily) unavailable.
        ConfigurationError: credentials, TLS or a subject were rejected.
        PublishError: the broker refused a publish (e.g. payload too large).
        TransportError: any other nats-py error.
    """
    try:
        yield
    except Exception as exc:
        mapped = translate(exc, topic=topic, event_id=event_id, what=what)
        if mapped is exc:
            raise
        raise mapped from exc
