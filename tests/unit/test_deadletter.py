"""Dead letters keep the original message and say why it died; the policy budgets retries."""

from __future__ import annotations

import pytest

from loom_ha.deadletter import CLOUDEVENT_JSON, DEAD_LETTER_TYPE, OCTET_STREAM, DeadLetter
from loom_ha.errors import ConfigurationError, SerializationError
from loom_ha.event import CloudEvent, EventCodec
from loom_ha.policy import DeliveryPolicy


def test_dead_letter_of_a_valid_event_round_trips_through_the_wire() -> None:
    """A handler-failure dead letter is a CloudEvent whose data decodes to the original."""
    codec = EventCodec()
    original = CloudEvent.create(source="/node/a", type="node.request", data={"task": "x"})
    letter = DeadLetter(
        reason="ValueError: boom",
        topic="node.request/node/a",
        origin="test",
        attempts=5,
        raw=codec.encode(original),
    )
    wire = codec.encode(letter.to_event())
    event = codec.decode(wire)
    assert event.type == DEAD_LETTER_TYPE
    assert event.datacontenttype == CLOUDEVENT_JSON
    back = DeadLetter.from_event(event)
    assert (back.reason, back.attempts, back.topic, back.origin) == (
        "ValueError: boom",
        5,
        "node.request/node/a",
        "test",
    )
    assert back.original(codec).model_dump() == original.model_dump()


def test_dead_letter_of_garbage_keeps_the_exact_bytes() -> None:
    """Malformed input is kept byte for byte, and its original() fails with the decode error."""
    codec = EventCodec()
    raw = b"\xff\x00 not a cloudevent"
    letter = DeadLetter(reason="not JSON", topic="t", origin="test", attempts=0, raw=raw)
    event = codec.decode(codec.encode(letter.to_event()))
    assert event.datacontenttype == OCTET_STREAM
    back = DeadLetter.from_event(event)
    assert back.raw == raw
    with pytest.raises(SerializationError):
        back.original(codec)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"specversion": "0.3", "id": "1", "source": "/s", "type": "t"}',  # spaced JSON
        b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":"\\u00fc"}',  # escape
        b'{"a":1.0e2}',  # a number form JSON would rewrite
        '{"ok":"\u00fc"}'.encode(),  # compact, unicode: may travel as JSON
    ],
)
def test_dead_letter_of_json_keeps_the_exact_bytes(raw: bytes) -> None:
    """A JSON original (valid or not) comes back byte for byte, never re-serialized."""
    codec = EventCodec()
    letter = DeadLetter(reason="bad", topic="t", origin="test", attempts=0, raw=raw)
    back = DeadLetter.from_event(codec.decode(codec.encode(letter.to_event())))
    assert back.raw == raw


def test_policy_backoff_grows_and_caps() -> None:
    """Delays double from backoff_initial up to backoff_max; the schedule has one per retry."""
    policy = DeliveryPolicy(max_deliveries=5, backoff_initial=0.5, backoff_max=2.0)
    assert policy.schedule() == [0.5, 1.0, 2.0, 2.0]
    assert not policy.exhausted(4)
    assert policy.exhausted(5)


@pytest.mark.parametrize(
    "kwargs", [{"max_deliveries": 0}, {"backoff_initial": -1}, {"backoff_multiplier": 0.5}]
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    """A policy that cannot work fails at construction, naming the option."""
    with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
        DeliveryPolicy(**kwargs)  # type: ignore[arg-type]
