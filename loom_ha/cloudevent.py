"""The CloudEvent model, field-for-field Loom 0.3.4's, and what loom-ha reads from any event.

`loom_ha.event` re-exports all of it beside the wire codec (`EventCodec`).
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from typing import Any, Protocol, Self, cast
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CloudEvent", "CloudEventLike", "idempotency_key", "loom_event_class"]


class CloudEvent(BaseModel):
    """A CloudEvent, field-for-field and default-for-default Loom 0.3.4's `CloudEvent`.

    Used when loom-agent is not installed; under Loom, codecs produce Loom's own class instead.
    """

    specversion: str = "1.0"
    id: str = Field(default_factory=lambda: str(uuid4()))
    source: str
    type: str
    datacontenttype: str | None = "application/json"
    dataschema: str | None = None
    subject: str | None = None
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    data: Any | None = None
    traceparent: str | None = None
    extensions: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    @classmethod
    def create(
        cls,
        source: str,
        type: str,
        data: Any | None = None,
        subject: str | None = None,
        traceparent: str | None = None,
    ) -> Self:
        """Build an event with a fresh id and the current UTC time (Loom's factory)."""
        return cls(source=source, type=type, data=data, subject=subject, traceparent=traceparent)

    def to_dict(self) -> dict[str, Any]:
        """Return the attributes that are set, as Loom's `to_dict` does."""
        return self.model_dump(exclude_none=True, by_alias=True)


class CloudEventLike(Protocol):
    """What loom-ha reads from an event; our `CloudEvent` and Loom's both satisfy it."""

    @property
    def id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def time(self) -> datetime: ...
    @property
    def data(self) -> Any: ...
    @property
    def traceparent(self) -> str | None: ...
    @property
    def extensions(self) -> dict[str, Any]: ...


def idempotency_key(event: CloudEventLike) -> str:
    """The CloudEvents idempotency key, ``source`` and ``id`` together: the one dedup key format.

    Every dedup window (`loom_ha.ha.dedup`) and every backend that skips redeliveries
    keys an event by it, so two events are the same event exactly when their keys match.
    """
    return f"{event.source}\x1f{event.id}"


def loom_event_class() -> type[BaseModel]:
    """Return Loom's `CloudEvent` class when loom-agent is importable, else ours."""
    try:
        with warnings.catch_warnings():
            # loom-agent 0.3.4 uses pydantic's deprecated json_encoders; not our warning to raise.
            warnings.simplefilter("ignore", DeprecationWarning)
            from loom.protocol.cloudevents import CloudEvent as LoomCloudEvent
    except ImportError:
        return CloudEvent
    return cast(type[BaseModel], LoomCloudEvent)
