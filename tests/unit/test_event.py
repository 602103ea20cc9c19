"""CloudEvent model and wire codec: spec validity, lossless round trips, validation errors."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from loom.protocol.cloudevents import CloudEvent as LoomEvent
from pydantic import BaseModel, ConfigDict, field_validator

from loom_ha.errors import SerializationError
from loom_ha.event import (
    DEFAULT_MAX_SIZE,
    CloudEvent,
    CloudEventLike,
    EventCodec,
    loom_event_class,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
loom_codec = EventCodec(LoomEvent)


def wire(**attrs: Any) -> bytes:
    """A minimal valid event as JSON bytes, with `attrs` merged in (None removes a key)."""
    event: dict[str, Any] = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    event.update(attrs)
    return json.dumps({k: v for k, v in event.items() if v is not None}).encode()


def same(a: BaseModel, b: BaseModel) -> None:
    """Assert two events are equal field by field, extras included."""
    assert a.model_dump() == b.model_dump()
    assert a.model_extra == b.model_extra
    assert type(a) is type(b)


# --- the model ------------------------------------------------------------------------------


def test_fields_and_defaults_match_loom() -> None:
    """Our CloudEvent has Loom's fields, in Loom's order, with the same defaults."""
    ours, theirs = CloudEvent.model_fields, LoomEvent.model_fields
    assert list(ours) == list(theirs)
    for name, info in ours.items():
        other = theirs[name]
        assert info.is_required() == other.is_required(), name
        assert info.default == other.default, name
        assert (info.default_factory is None) == (other.default_factory is None), name
    a, b = CloudEvent(source="s", type="t"), LoomEvent(source="s", type="t")
    assert type(a.id) is type(b.id) and len(a.id) == len(b.id)
    assert a.time.tzinfo is not None and b.time.tzinfo is not None
    assert a.extensions == b.extensions == {}
    assert CloudEvent.model_config["extra"] == LoomEvent.model_config["extra"] == "allow"
    assert CloudEvent.model_config["populate_by_name"] is True


def test_create_and_to_dict_behave_like_loom() -> None:
    """`create` and `to_dict` give the same shapes as Loom's versions."""
    ours = CloudEvent.create("/a", "node.request", data={"x": 1}, subject="node/b")
    theirs = LoomEvent.create("/a", "node.request", data={"x": 1}, subject="node/b")
    assert isinstance(ours, CloudEvent)
    assert ours.to_dict().keys() == theirs.to_dict().keys()


def test_both_classes_satisfy_the_protocol() -> None:
    """Code typed against CloudEventLike can read either class."""

    def read(event: CloudEventLike) -> tuple[str, str | None, dict[str, Any]]:
        return event.id, event.traceparent, event.extensions

    for cls in (CloudEvent, LoomEvent):
        event = cls.create("/a", "t", traceparent=TRACEPARENT)
        assert read(event) == (event.id, TRACEPARENT, {})


def test_loom_event_class_is_looms() -> None:
    """With loom-agent installed, the configured class is Loom's own."""
    assert loom_event_class() is LoomEvent


# --- spec validity ----------------------------------------------------------------------------


def test_sdk_parses_our_bytes_with_every_attribute() -> None:
    """The official SDK accepts our bytes and sees every attribute as we meant it."""
    event = LoomEvent(
        source="/node/a",
        type="node.request",
        subject="node/b",
        dataschema="https://example.com/schema",
        datacontenttype="application/json",
        time=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2))),
        data={"task": "hello", "n": 1},
        traceparent=TRACEPARENT,
        extensions={"timeout": 30, "nested": {"a": [1, 2]}},
        priority=5,
        flag=True,
        label="x",
        score=0.5,
    )
    parsed = JSONFormat().read(None, loom_codec.encode(event))
    assert parsed.get_specversion() == "1.0"
    assert parsed.get_id() == event.id
    assert parsed.get_source() == "/node/a"
    assert parsed.get_type() == "node.request"
    assert parsed.get_subject() == "node/b"
    assert parsed.get_dataschema() == "https://example.com/schema"
    assert parsed.get_datacontenttype() == "application/json"
    assert parsed.get_time() == event.time
    assert parsed.get_data() == {"task": "hello", "n": 1}
    assert parsed.get_extension("traceparent") == TRACEPARENT
    assert json.loads(parsed.get_extension("loomext")) == event.extensions
    assert parsed.get_extension("priority") == 5
    assert parsed.get_extension("flag") is True
    assert parsed.get_extension("label") == "x"
    assert json.loads(parsed.get_extension("loomextra")) == {"score": 0.5}


def test_sdk_parses_binary_data_and_edge_attributes() -> None:
    """Bytes data, a None content type and an empty subject still make a valid event."""
    event = LoomEvent(source="/a", type="t", data=b"\x00\xff", datacontenttype=None, subject="")
    parsed = JSONFormat().read(None, loom_codec.encode(event))
    assert parsed.get_data() == b"\x00\xff"
    assert parsed.get_datacontenttype() is None
    assert parsed.get_subject() is None
    assert json.loads(parsed.get_extension("loomextra")) == {"datacontenttype": None, "subject": ""}
    same(loom_codec.decode(loom_codec.encode(event)), event)


def test_decodes_foreign_sdk_events() -> None:
    """Events written by the SDK, with their own extension attributes, decode with extras."""
    sdk = SdkEvent(
        {
            "id": "42",
            "source": "urn:x",
            "type": "com.example.ping",
            "subject": "s",
            "time": datetime(2024, 1, 1, tzinfo=UTC),
            "partitionkey": "k1",
            "sequence": 7,
        },
        {"ping": True},
    )
    event = loom_codec.decode(JSONFormat().write(sdk))
    assert isinstance(event, LoomEvent)
    assert (event.id, event.source, event.type, event.subject) == (
        "42",
        "urn:x",
        "com.example.ping",
        "s",
    )
    assert event.time == datetime(2024, 1, 1, tzinfo=UTC)
    assert event.data == {"ping": True}
    assert event.datacontenttype == "application/json"  # absent: the class default
    assert event.model_extra == {"partitionkey": "k1", "sequence": 7}
    assert event.partitionkey == "k1"
    binary = SdkEvent({"id": "1", "source": "/s", "type": "t"}, b"raw")
    assert loom_codec.decode(JSONFormat().write(binary)).data == b"raw"


def test_decodes_upstream_loom_json() -> None:
    """What upstream Loom transports publish (`model_dump_json()`) decodes losslessly."""
    event = LoomEvent(
        source="/a", type="t", datacontenttype=None, extensions={"timeout": 5}, loomext="x", k=[1]
    )
    same(loom_codec.decode(event.model_dump_json()), event)


# --- round trips ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
# Fixed offsets in whole minutes, as RFC 3339 has them. (zoneinfo zones would add nothing but
# Python's rule that inter-zone == is False for times in a DST fold.)
offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
aware_times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC) | offsets
)
extra_names = st.text(min_size=1, max_size=12).filter(lambda n: n not in LoomEvent.model_fields)


@settings(max_examples=300, deadline=None)
@given(
    id=st.text(min_size=1),
    source=st.text(min_size=1),
    type=st.text(min_size=1),
    subject=st.none() | st.text(),
    dataschema=st.none() | st.text(),
    datacontenttype=st.none() | st.text() | st.just("application/json"),
    time=aware_times,
    data=json_values | st.binary(),
    traceparent=st.none() | st.just(TRACEPARENT) | st.text(),
    extensions=st.dictionaries(st.text(), json_values, max_size=4),
    extras=st.dictionaries(
        extra_names | st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), json_values, max_size=4
    ),
)
def test_loom_events_round_trip_losslessly(extras: dict[str, Any], **fields: Any) -> None:
    """Any Loom event with JSON-able content survives encode/decode field for field."""
    extras = {k: v for k, v in extras.items() if k not in fields}
    event = LoomEvent(**fields, **extras)
    raw = loom_codec.encode(event)
    JSONFormat().read(None, raw)  # valid per the SDK, whatever the content
    decoded = loom_codec.decode(raw)
    assert isinstance(decoded, LoomEvent)
    same(decoded, event)
    assert decoded.model_fields_set >= set(extras)


def test_awkward_extras_round_trip_via_loomextra() -> None:
    """Extras with reserved or illegal names, or non-scalar values, survive in loomextra."""
    extras: dict[str, Any] = {
        "loomext": "a",
        "loomextra": 1,
        "data_base64": "b",
        "Upper": True,
        "with-dash": "c",
        "big": 2**31,
        "small": -(2**31),
        "ratio": 0.25,
        "nothing": None,
        "items": [1, {"x": None}],
        "ok": 2**31 - 1,
    }
    event = LoomEvent(source="/a", type="t", **extras)
    raw = loom_codec.encode(event)
    top = json.loads(raw)
    assert {k for k in extras if k in top} == {"small", "ok", "loomextra"}  # ours, a string
    assert set(json.loads(top["loomextra"])) == set(extras) - {"small", "ok"}
    JSONFormat().read(None, raw)
    same(loom_codec.decode(raw), event)


def test_our_class_round_trips_and_is_the_default() -> None:
    """The default codec decodes into our CloudEvent, losslessly."""
    codec: EventCodec[CloudEvent] = EventCodec()
    assert codec.event_class is CloudEvent and codec.max_size == DEFAULT_MAX_SIZE
    event = CloudEvent.create("/a", "t", data=[1, "x"], traceparent=TRACEPARENT)
    event.extensions["timeout"] = 2.5
    same(codec.decode(codec.encode(event)), event)


def test_any_input_buffer_type_decodes() -> None:
    """bytes, bytearray, memoryview and str inputs decode alike."""
    raw = loom_codec.encode(LoomEvent.create("/a", "t", data="é"))
    for value in (raw, bytearray(raw), memoryview(raw), raw.decode()):
        assert loom_codec.decode(value).data == "é"


def test_times_are_rfc3339_and_naive_means_utc() -> None:
    """UTC is written with Z; naive times go out as UTC; second offsets keep the instant."""
    naive = LoomEvent(source="/a", type="t", time=datetime(2024, 1, 2, 3, 4, 5))
    raw = loom_codec.encode(naive)
    assert b'"time":"2024-01-02T03:04:05Z"' in raw
    assert loom_codec.decode(raw).time == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    odd = datetime(2024, 1, 1, tzinfo=timezone(timedelta(seconds=37)))
    assert (
        loom_codec.decode(loom_codec.encode(LoomEvent(source="/a", type="t", time=odd))).time == odd
    )


def test_absent_time_and_content_type_take_class_defaults() -> None:
    """A foreign event without time or datacontenttype gets the class defaults."""
    before = datetime.now(UTC)
    event = loom_codec.decode(wire())
    assert event.datacontenttype == "application/json"
    assert before <= event.time <= datetime.now(UTC)
    assert "time" not in event.model_fields_set
    assert loom_codec.decode(wire(datacontenttype="text/plain")).datacontenttype == "text/plain"


def test_subclass_with_more_fields_uses_validation() -> None:
    """An event class with extra typed fields gets them validated, from extension attributes."""

    class Prioritised(CloudEvent):
        priority: int = 0

    codec = EventCodec(Prioritised)
    event = Prioritised.create("/a", "t")
    event.priority = 3
    decoded = codec.decode(codec.encode(event))
    assert isinstance(decoded, Prioritised) and decoded.priority == 3
    with pytest.raises(SerializationError, match="priority"):
        codec.decode(wire(priority="high"))


def test_subclass_fields_and_extras_travel_together() -> None:
    """A subclass's own fields and its extras are encoded alike, and both come back."""

    class Labelled(CloudEvent):
        priority: int = 0
        note: str | None = None

    codec = EventCodec(Labelled)
    event = Labelled(source="/a", type="t", priority=3, label="x", Bad=[1])
    top = json.loads(codec.encode(event))
    assert (top["priority"], top["label"]) == (3, "x")
    assert json.loads(top["loomextra"]) == {"note": None, "Bad": [1]}
    same(codec.decode(codec.encode(event)), event)


def test_classes_with_validators_are_validated() -> None:
    """An event class with its own validator gets it run on decode, not skipped."""

    class Shouting(CloudEvent):
        @field_validator("type")
        @classmethod
        def upper(cls, value: str) -> str:
            return value.upper()

    assert EventCodec(Shouting).decode(wire(type="ping")).type == "PING"


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "JSON object, got list"),
        (b'"event"', "JSON object, got str"),
        (wire(specversion="0.3"), "specversion must be '1.0'"),
        (wire(specversion=None), "specversion must be '1.0', got None"),
        (wire(id=None), "'id' must be a non-empty string"),
        (wire(id=""), "'id' must be a non-empty string"),
        (wire(source=""), "'source' must be a non-empty string"),
        (wire(type=7), "'type' must be a non-empty string"),
        (wire(time="yesterday"), "time"),
        (wire(time="2024-01-01T00:00:00"), "time"),
        (wire(subject=5), "subject"),
        (wire(traceparent=["x"]), "traceparent"),
        (wire(datacontenttype=1), "datacontenttype"),
        (wire(data_base64="!!!"), "data_base64"),
        (wire(data=1, data_base64=base64.b64encode(b"x").decode()), "both 'data' and"),
        (wire(loomext="{nope"), "'loomext'"),
        (wire(loomext="[1]"), "'loomext'"),
        (wire(loomextra='{"subject": 1}'), "'subject'"),
        (wire(loomextra='{"id": "2"}'), "must not carry 'id'"),
        (wire(extensions=[1]), "extensions"),
    ],
)
def test_invalid_events_raise_serialization_error(raw: bytes, reason: str) -> None:
    """Every kind of bad input raises SerializationError whose reason names the problem."""
    with pytest.raises(SerializationError) as info:
        loom_codec.decode(raw)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


attribute_names = st.sampled_from(
    [*LoomEvent.model_fields, "data_base64", "loomext", "loomextra", "x"]
)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary()
    | st.dictionaries(attribute_names, json_values | st.just("1.0")).map(
        lambda obj: json.dumps(obj).encode()
    )
)
def test_decode_raises_only_serialization_error(raw: bytes) -> None:
    """Whatever the input, decode returns an event or raises SerializationError, nothing else."""
    try:
        assert isinstance(loom_codec.decode(raw), LoomEvent)
    except SerializationError as exc:
        assert exc.reason


def test_pathological_json_is_rejected_cleanly() -> None:
    """Deep nesting (top level, in data, in loomext) and lone surrogates are SerializationErrors."""
    deep = "[" * 5000 + "]" * 5000
    for raw in (deep.encode(), wire(data="DEEP").replace(b'"DEEP"', deep.encode())):
        with pytest.raises(SerializationError, match="not valid JSON"):
            loom_codec.decode(raw)
    with pytest.raises(SerializationError, match="'loomext'"):
        loom_codec.decode(wire(loomext='{"a":' + deep + "}"))
    surrogate = '{"specversion": "1.0", "id": "\ud800", "source": "/s", "type": "t"}'
    assert "\ud800" in surrogate
    with pytest.raises(SerializationError, match="not valid JSON"):
        loom_codec.decode(surrogate)


def test_size_limit_is_checked_before_parsing() -> None:
    """Input over max_size is rejected with its size and the limit, even if it is not JSON."""
    codec = EventCodec(LoomEvent, max_size=100)
    with pytest.raises(SerializationError, match="101 bytes, over the 100-byte limit"):
        codec.decode(b"x" * 101)
    with pytest.raises(SerializationError, match="over the 100-byte limit"):
        codec.decode("é" * 60)  # 60 characters, 120 bytes
    small = wire()
    assert len(small) <= 100
    assert codec.decode(small).id == "1"
    with pytest.raises(SerializationError, match="over the 100-byte limit"):
        codec.encode(LoomEvent.create("/a", "t", data="x" * 100))


def test_unencodable_events_raise_serialization_error() -> None:
    """Events that cannot become valid CloudEvents fail to encode with a reason."""
    cases: list[tuple[BaseModel, str]] = [
        (LoomEvent(source="", type="t"), "'source' must be a non-empty string"),
        (LoomEvent(source="/a", type="t", id=""), "'id' must be a non-empty string"),
        (LoomEvent(source="/a", type="t", specversion="0.3"), "specversion must be '1.0'"),
        (LoomEvent(source="/a", type="t", data={"x": object()}), "cannot encode"),
    ]

    class Partial(BaseModel):
        model_config = ConfigDict(extra="allow")
        source: str

    cases.append((Partial(source="/a"), "lacks CloudEvent fields"))
    for event, reason in cases:
        with pytest.raises(SerializationError, match=reason):
            loom_codec.encode(event)
