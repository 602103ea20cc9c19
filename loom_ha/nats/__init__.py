"""NATS backends: core NATS (at-most-once) and JetStream (at-least-once).

Needs the ``nats-py`` client: ``pip install 'loom-ha[nats]'``.
"""

from __future__ import annotations

try:
    import nats as _nats  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("loom_ha.nats needs the nats-py client: pip install 'loom-ha[nats]'") from exc

from loom_ha.nats.connection import ConnectionOptions, NatsOptions, StateListener
from loom_ha.nats.core import NatsCoreTransport, NatsTransport
from loom_ha.nats.dedup import NatsDedup
from loom_ha.nats.jetstream import JetStreamTransport
from loom_ha.nats.options import URL_OPTIONS, ConsumerOptions, StreamOptions, url_options
from loom_ha.nats.subjects import SubjectCodec

__all__ = [
    "URL_OPTIONS",
    "ConnectionOptions",
    "ConsumerOptions",
    "JetStreamTransport",
    "NatsCoreTransport",
    "NatsDedup",
    "NatsOptions",
    "NatsTransport",
    "StateListener",
    "StreamOptions",
    "SubjectCodec",
    "url_options",
]
