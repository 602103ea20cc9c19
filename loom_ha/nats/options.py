"""JetStream's options: the stream events are kept in, and how consumers deliver.

Their own module, so the consumer code reads them without importing the transport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from loom_ha.errors import ConfigurationError
from loom_ha.policy import DeliveryPolicy

__all__ = ["ConsumerOptions", "StreamOptions"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    """The stream events are kept in, and the dead-letter stream.

    Attributes:
        name: stream name; it captures ``<subject_prefix>.>``.
        replicas: copies; None picks 3 when connected to a cluster of 3+ servers, else 1.
        max_age, max_msgs, max_bytes: retention limits (None: unlimited).
        duplicate_window: seconds during which a re-published event id is dropped.
        storage: ``file`` (survives restarts) or ``memory``.
        dead_letter_stream: name of the stream capturing ``<dead_letter_prefix>.>``.
        dead_letter_max_age: how long dead letters are kept (None: forever).
        manage: create/update both streams on connect (else they must exist).
    """

    name: str = "LOOM"
    replicas: int | None = None
    max_age: float | None = None
    max_msgs: int | None = None
    max_bytes: int | None = None
    duplicate_window: float = 120.0
    storage: Literal["file", "memory"] = "file"
    dead_letter_stream: str = "LOOM_DLQ"
    dead_letter_max_age: float | None = 14 * 24 * 3600.0
    manage: bool = True

    def __post_init__(self) -> None:
        for attr in ("name", "dead_letter_stream"):
            if not _NAME.fullmatch(getattr(self, attr)):
                raise ConfigurationError(
                    f"stream {attr} {getattr(self, attr)!r}: use [A-Za-z0-9_-]"
                )
        if self.name == self.dead_letter_stream:
            raise ConfigurationError("stream name and dead_letter_stream must differ")
        if self.replicas is not None and not 1 <= self.replicas <= 5:
            raise ConfigurationError(f"stream replicas must be 1..5, got {self.replicas}")
        if self.duplicate_window <= 0:
            raise ConfigurationError("stream duplicate_window must be > 0 seconds")
        for attr in ("max_age", "max_msgs", "max_bytes", "dead_letter_max_age"):
            value = getattr(self, attr)
            if value is not None and value <= 0:
                raise ConfigurationError(f"stream {attr} must be > 0 or None, got {value}")


@dataclass(frozen=True, kw_only=True)
class ConsumerOptions:
    """How consumers deliver, redeliver and watch their pulls.

    Attributes:
        policy: attempts in total and the nak backoff between them.
        ack_wait: seconds before an unacked delivery goes to another member (handler
            crashed, process died): keep it above your slowest handler.
        batch: messages requested per pull.
        heartbeat: idle heartbeat of pulls; ~3 missed ones re-issue the pull.
        pull_expires: lifetime of one pull request, seconds.
        max_ack_pending: unacked deliveries per consumer before the server pauses it.
        start: ``new`` (default: no history replay) or ``all`` (replay the stream).
        fanout_inactive_threshold: a fan-out consumer left behind by a dead process is
            removed by the server after this many idle seconds.
        dedup_window: event ids remembered per consumer, so a redelivery whose ack was
            lost never reaches a handler twice.
        subscribe_timeout: bound of `subscribe()` (consumer creation), seconds.
    """

    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    ack_wait: float = 30.0
    batch: int = 256
    heartbeat: float = 2.0
    pull_expires: float = 30.0
    max_ack_pending: int = 2048
    start: Literal["new", "all"] = "new"
    fanout_inactive_threshold: float = 300.0
    dedup_window: int = 65_536
    subscribe_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.max_ack_pending < 1 or self.dedup_window < 1:
            raise ConfigurationError("batch, max_ack_pending and dedup_window must be >= 1")
        if self.heartbeat <= 0 or self.pull_expires < 2 * self.heartbeat:
            raise ConfigurationError("need heartbeat > 0 and pull_expires >= 2 * heartbeat")
        if self.ack_wait <= 0 or self.subscribe_timeout <= 0:
            raise ConfigurationError("ack_wait and subscribe_timeout must be > 0")
        if self.start not in ("new", "all"):
            raise ConfigurationError(f"start must be 'new' or 'all', got {self.start!r}")
