"""Dead letters: an event that could not be handled, kept with why it died.

A dead letter is itself a CloudEvent (type ``loom_ha.deadletter``), so any
transport can carry it and any CloudEvents tool can read it. It keeps:

* the original, byte for byte: as ``data`` holding the original CloudEvent JSON when it
  was a JSON object that reads back to the same bytes
  (``datacontenttype: application/cloudevents+json``), else the raw bytes as received
  (``data_base64``, ``application/octet-stream``), e.g. for malformed input;
* why, how often and from where, as top-level extension attributes:
  ``deadreason``, ``deadattempts``, ``deadtopic``, ``deadorigin``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loom_ha.event import CloudEvent, EventCodec

DEAD_LETTER_TYPE = "loom_ha.deadletter"
CLOUDEVENT_JSON = "application/cloudevents+json"
OCTET_STREAM = "application/octet-stream"

DEAD_LETTER_CODEC: EventCodec[CloudEvent] = EventCodec(max_size=1 << 30)
"""Encodes dead letters. Not the transport's size-limited codec: a dead letter carries the
original, so the letter of an oversized event is oversized too and must still be kept; the
broker's own limit (NATS max_payload, Redis' 512 MB) bounds it."""


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """Why one message died.

    Attributes:
        reason: what went wrong (a decode error's reason, a handler's exception).
        topic: the Loom topic it was published on (or the wire name if unknown).
        origin: where it died, e.g. ``redis-streams:loom:node.request/node/a``.
        attempts: handler attempts made (0 for messages that never decoded).
        raw: the bytes as received.
    """

    reason: str
    topic: str
    origin: str
    attempts: int
    raw: bytes

    def to_event(self, source: str = "/loom_ha/deadletter") -> CloudEvent:
        """The dead letter as a CloudEvent carrying the original and why it died."""
        try:
            original: Any = json.loads(self.raw)
        except ValueError:
            original = None
        # Inline JSON only when it reads back to the very bytes received: a dead letter
        # must keep the original exactly (spacing, escapes, number forms included).
        lossless = isinstance(original, dict) and _compact(original) == self.raw
        content_type = CLOUDEVENT_JSON if lossless else OCTET_STREAM
        return CloudEvent(
            source=source,
            type=DEAD_LETTER_TYPE,
            subject=self.topic,
            datacontenttype=content_type,
            data=original if content_type == CLOUDEVENT_JSON else self.raw,
            deadreason=self.reason[:1000],
            deadattempts=self.attempts,
            deadtopic=self.topic,
            deadorigin=self.origin,
        )

    @classmethod
    def from_event(cls, event: Any, codec: EventCodec[Any] | None = None) -> DeadLetter:
        """Read a dead letter back from its CloudEvent (as produced by `to_event`)."""
        extra = event.model_extra or {}
        if event.datacontenttype == CLOUDEVENT_JSON:
            raw = _compact(event.data)
        else:
            raw = bytes(event.data or b"")
        return cls(
            reason=str(extra.get("deadreason", "")),
            topic=str(extra.get("deadtopic", event.subject or "")),
            origin=str(extra.get("deadorigin", "")),
            attempts=int(extra.get("deadattempts", 0)),
            raw=raw,
        )

    def original(self, codec: EventCodec[Any]) -> Any:
        """The original event decoded with `codec` (raises SerializationError if it was bad)."""
        return codec.decode(self.raw)


def _compact(value: Any) -> bytes:
    """JSON without spaces or escapes, as loom-ha's codec writes it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
