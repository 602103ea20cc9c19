"""The CloudEvents 1.0 JSON wire codec of loom-ha, and the CloudEvent model it carries
(defined in `loom_ha.cloudevent`, re-exported here).

Wire bytes are CloudEvents 1.0 JSON structured mode, always a valid CloudEvent, and lossless for
Loom's model: ``decode(encode(ev))`` has the same ``model_dump()`` and ``model_extra``. Mapping:

- ``specversion`` is ``"1.0"`` (other values cannot be encoded); ``id``, ``source``, ``type``:
  1:1, non-empty strings both ways, verbatim (no URI checks: Loom makes none).
- ``datacontenttype``, ``dataschema``, ``subject``: 1:1 if a non-empty string, omitted if None.
  The spec has no null or empty values, so ``""`` and a None content type go in ``loomextra``.
  An absent ``datacontenttype`` decodes to the class default (``"application/json"``, which the
  JSON format assumes too); an explicit ``null`` decodes to None.
- ``time``: RFC 3339 with offset (``Z`` for UTC). The spec requires an offset, so a naive time
  is taken as UTC and comes back UTC-aware; offsets with seconds are rewritten as UTC (same
  instant). Absent on the wire: the class default (now).
- ``data``: the JSON value, omitted if None; ``bytes`` (bytearray, memoryview) go to
  ``data_base64`` and come back as ``bytes``. What JSON lacks (tuples, non-str keys, NaN,
  pydantic models) is written as msgspec writes it and comes back as that JSON value.
- ``traceparent``: the top-level ``traceparent`` attribute (distributed-tracing extension).
- ``extensions``: ``loomext``, a string holding the dict as JSON (extension values must be
  scalars); omitted when empty.
- Extra fields (``extra='allow'``; also a subclass's own fields): a name matching ``[a-z0-9]+``
  (but not ours) with a str, bool or int32 value is a top-level extension attribute; the rest go
  in ``loomextra``, a string holding a JSON object of name -> value.

Decoding is lenient: unknown attributes become extra fields, ``null`` optional attributes mean
None, and a top-level ``extensions`` object is read as such (``loomext``/``loomextra`` are then
plain extras), so upstream Loom transports' ``model_dump_json()`` output decodes too. Every
failure is a `SerializationError` naming the attribute.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from operator import itemgetter
from typing import Annotated, Any, Generic, Literal, TypeVar, cast

import msgspec
from pydantic import BaseModel, ValidationError

from loom_ha.cloudevent import CloudEvent, CloudEventLike, idempotency_key, loom_event_class
from loom_ha.errors import SerializationError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "CloudEvent",
    "CloudEventLike",
    "EventCodec",
    "idempotency_key",
    "loom_event_class",
]

DEFAULT_MAX_SIZE = 1 << 20


_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]


class _Wire(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """The attributes we know: decoding is strict (unknown ones divert to `_decode_loose`);
    encoding leaves out None and UNSET."""

    specversion: Literal["1.0"]
    id: _NonEmpty
    source: _NonEmpty
    type: _NonEmpty
    time: _AwareTime | msgspec.UnsetType = msgspec.UNSET
    datacontenttype: str | msgspec.UnsetType | None = msgspec.UNSET
    dataschema: str | None = None
    subject: str | None = None
    traceparent: str | None = None
    loomext: str | None = None
    loomextra: str | None = None
    extensions: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    data: Any = None
    data_base64: bytes | None = None
    # Last (encode fills the fields above by position) and never encoded from here: an extra
    # attribute of the event, named only so that decoding it stays on the strict, fast path
    # (W3C tracing writes it beside traceparent, loom_ha.tracing).
    tracestate: str | msgspec.UnsetType = msgspec.UNSET


_WIRE_NAMES = frozenset(_Wire.__struct_fields__)
_FIELDS = tuple(CloudEvent.model_fields)
_FIELD_SET = frozenset(_FIELDS)
_NULLABLE = ("datacontenttype", "dataschema", "subject")
_RESERVED = (_WIRE_NAMES - {"tracestate"}) | _FIELD_SET  # tracestate is written as an extra
_BINARY = (bytes, bytearray, memoryview)
_INT32 = range(-(1 << 31), 1 << 31)
_UNSET = msgspec.UNSET
_legal_name = re.compile(r"[a-z0-9]+").fullmatch
_read_fields = itemgetter(*_FIELDS)
# BaseModel's slots, set the way pydantic's own model_construct does, minus its per-field loop.
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def _enc_hook(obj: Any) -> Any:
    """Let msgspec write pydantic models nested in data/extensions as their JSON dump."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


_encode = msgspec.json.Encoder(enc_hook=_enc_hook).encode
_strict_decode = msgspec.json.Decoder(_Wire).decode
_any_decode = msgspec.json.Decoder().decode
_object_decode = msgspec.json.Decoder(dict[str, Any]).decode
# Malformed, nested beyond msgspec's depth limit, or a str with lone surrogates.
_PARSE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeError)
# What a bad field value can make the encoder raise (non-datetime time, unencodable data, ...).
_BAD_VALUE_ERRORS = (AttributeError, TypeError, ValueError, ArithmeticError, RecursionError)
_ENCODE_ERRORS = (msgspec.EncodeError, *_BAD_VALUE_ERRORS)
E = TypeVar("E", bound=BaseModel)


def _fast_build_ok(cls: type[BaseModel]) -> bool:
    """True when `cls` instances may be built from checked values without pydantic validation:
    its schema is Loom's (names and annotations), extras are allowed, and it has no validators,
    private attributes or post-init hooks that construction would skip."""
    loom = sys.modules.get("loom.protocol.cloudevents")  # loaded if cls derives from Loom's
    refs = (CloudEvent, getattr(loom, "CloudEvent", CloudEvent))
    fields, hooks = cls.model_fields, cls.__pydantic_decorators__
    return (
        fields.keys() == _FIELD_SET
        and all(
            f.annotation in {r.model_fields[n].annotation for r in refs} for n, f in fields.items()
        )
        and cls.model_config.get("extra") == "allow"
        and not (
            cls.__private_attributes__ or cls.__pydantic_post_init__ or cls.__pydantic_root_model__
        )
        and not (hooks.validators or hooks.field_validators or hooks.model_validators)
        and not hooks.root_validators
    )


class EventCodec(Generic[E]):
    """Encode events to CloudEvents 1.0 JSON bytes; decode them, validated, into `event_class`.

    Safe to share between tasks and threads (the only state is a per-class cache).

    Args:
        event_class: the class decoded events are instances of (Loom's under LoomApp).
        max_size: largest accepted encoded event in bytes; bigger input is rejected unparsed.
    """

    __slots__ = ("_ct_default", "_fast", "_more_fields", "_time_default", "event_class", "max_size")

    def __init__(
        self,
        event_class: type[E] = CloudEvent,  # type: ignore[assignment]
        *,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.event_class: type[E] = event_class
        self.max_size: int = max_size
        self._fast = _fast_build_ok(event_class)
        fields = event_class.model_fields
        self._ct_default: Any = fields["datacontenttype"].default if self._fast else _UNSET
        self._time_default = fields["time"] if self._fast else None
        # Per event class seen by encode(): its fields beyond Loom's, which travel like extras.
        self._more_fields: dict[type, tuple[str, ...]] = {}

    def encode(self, event: BaseModel) -> bytes:
        """Return `event` as CloudEvents 1.0 JSON (structured mode) bytes.

        Raises:
            SerializationError: the event lacks a Loom field, has an empty id/source/type or a
                specversion other than "1.0", holds values JSON cannot carry, or would be
                bigger than `max_size` (so consumers would reject it).
        """
        try:
            more = self._more_fields.get(type(event))
            if more is None:
                more = self._learn(type(event))
            d = event.__dict__
            sv, id_, source, type_, ct, schema, subject, time, data, tp, ext = _read_fields(d)
            if not (sv == "1.0" and id_ and source and type_):
                _check_required(d)
            fix: dict[str, Any] | None = None
            if not ct or schema == "" or subject == "":
                # The spec has no null or empty attribute values: loomextra carries them.
                fix = {name: "" for name in _NULLABLE if d[name] == ""}
                if ct is None:
                    fix["datacontenttype"] = None
                ct, schema, subject = ct or _UNSET, schema or None, subject or None
            if time.tzinfo is not UTC:
                time = _rfc3339_time(time)
            data64 = None
            if data is not None and type(data) is not dict and isinstance(data, _BINARY):
                data64 = bytes(data)
                data = None
            extras = event.__pydantic_extra__
            top = None
            if extras or more:
                top, fix = _split_extras({**(extras or {}), **{m: d[m] for m in more}}, fix)
            out = _encode(
                _Wire(
                    "1.0", id_, source, type_, time, ct, schema, subject, tp,
                    _encode(ext).decode() if ext else None,
                    _encode(fix).decode() if fix else None, _UNSET, data, data64,
                )
            )  # fmt: skip
            if top:  # splice the extension attributes into the object: '{...' + ',...}'
                out = out[:-1] + b"," + _encode(top)[1:]
            if len(out) > self.max_size:  # fail at the publisher, not at every consumer
                raise SerializationError(
                    f"event is {len(out)} bytes, over the {self.max_size}-byte limit"
                )
            return out
        except SerializationError:
            raise
        except KeyError as exc:
            raise SerializationError(f"{type(event).__name__} has no field {exc}") from exc
        except _ENCODE_ERRORS as exc:
            raise SerializationError(f"cannot encode {type(event).__name__}: {exc}") from exc

    def decode(self, data: bytes | bytearray | memoryview | str) -> E:
        """Parse and validate one CloudEvents 1.0 JSON event into an `event_class` instance.

        Raises:
            SerializationError: too large (checked before parsing), not JSON, not an object, or
                an attribute is missing or invalid; the reason names it.
        """
        size = len(data) if type(data) is bytes else _size(data)
        if size > self.max_size:
            raise SerializationError(f"event is {size} bytes, over the {self.max_size}-byte limit")
        try:
            w = _strict_decode(data)
            extras: dict[str, Any] = {}
        except msgspec.ValidationError:
            # Unknown attributes, or a real error: the slow path tells which.
            w, extras = _decode_loose(data)
        except _PARSE_ERRORS as exc:
            raise SerializationError(f"not valid JSON: {exc}") from exc
        ext = w.extensions
        if ext is _UNSET:
            lx = w.loomext
            try:
                ext = {} if lx is None else _object_decode(lx)
            except _PARSE_ERRORS:
                ext = _decode_attr("loomext", cast(str, lx))  # raises, naming the attribute
        ct = w.datacontenttype
        values = {
            "specversion": "1.0",
            "id": w.id,
            "source": w.source,
            "type": w.type,
            "datacontenttype": self._ct_default if ct is _UNSET else ct,
            "dataschema": w.dataschema,
            "subject": w.subject,
            "time": w.time,
            "data": w.data if w.data_base64 is None else _binary_data(w),
            "traceparent": w.traceparent,
            "extensions": ext,
        }
        if w.tracestate is not _UNSET:
            extras = {**extras, "tracestate": w.tracestate}
        if w.loomextra is not None or w.extensions is not _UNSET:
            _loom_attrs(w, values, extras)
        if not self._fast:
            return self._validate(values, extras)
        fields_set = set(_FIELD_SET)
        if values["time"] is _UNSET:
            fields_set.discard("time")
            values["time"] = self._time_default.get_default(call_default_factory=True)  # type: ignore[union-attr]
        if extras:
            fields_set.update(extras)
        # The state pydantic validation leaves behind, minus its work: every value is checked.
        event = object.__new__(self.event_class)
        _set_dict(event, values)
        _set_fields_set(event, fields_set)
        _set_extra(event, extras)
        _set_private(event, None)
        return event

    def _learn(self, cls: type) -> tuple[str, ...]:
        """Check that `cls` has Loom's fields and remember which others it has."""
        fields = getattr(cls, "model_fields", {})
        missing = [name for name in _FIELDS if name not in fields]
        if missing:
            raise SerializationError(f"{cls.__name__} lacks CloudEvent fields {missing}")
        more = tuple(name for name in fields if name not in _FIELD_SET)
        self._more_fields[cls] = more
        return more

    def _validate(self, values: dict[str, Any], extras: dict[str, Any]) -> E:
        """Build an event class not shaped like Loom's the safe way: full pydantic validation."""
        for name in ("datacontenttype", "time"):
            if values[name] is _UNSET:
                del values[name]
        try:
            return self.event_class.model_validate({**extras, **values})
        except ValidationError as exc:
            raise SerializationError(f"invalid {self.event_class.__name__}: {exc}") from exc


def _size(data: bytes | bytearray | memoryview | str) -> int:
    """Return the encoded size in bytes (UTF-8 for str) without copying when possible."""
    if isinstance(data, str):
        return len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
    return data.nbytes if isinstance(data, memoryview) else len(data)


def _check_required(attrs: dict[str, Any]) -> None:
    """Raise a clear error if specversion, id, source or type is missing or wrong."""
    if attrs.get("specversion") != "1.0":
        raise SerializationError(f"specversion must be '1.0', got {attrs.get('specversion')!r}")
    for name in ("id", "source", "type"):
        if not attrs.get(name) or not isinstance(attrs[name], str):
            raise SerializationError(f"attribute '{name}' must be a non-empty string")


def _rfc3339_time(time: datetime) -> datetime:
    """Give `time` an offset RFC 3339 can write: naive means UTC; second offsets become UTC."""
    offset = time.utcoffset()
    if offset is None:
        return time.replace(tzinfo=UTC)
    if offset.seconds % 60 or offset.microseconds:
        return time.astimezone(UTC)
    return time


def _split_extras(
    items: dict[str, Any], fix: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Sort extra values into legal top-level extension attributes and `loomextra` entries."""
    top: dict[str, Any] = {}
    for name, value in items.items():
        kind = type(value)
        if (
            (kind is str or kind is bool or (kind is int and value in _INT32))
            and name not in _RESERVED
            and _legal_name(name)
        ):
            top[name] = value
        else:
            fix = fix if fix is not None else {}
            fix[name] = value
    return top, fix


def _decode_loose(data: bytes | bytearray | memoryview | str) -> tuple[_Wire, dict[str, Any]]:
    """Decode tolerating unknown attributes, which are returned separately as extras."""
    try:
        obj = _any_decode(data)
    except _PARSE_ERRORS as exc:
        raise SerializationError(f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SerializationError(f"a CloudEvent is a JSON object, got {type(obj).__name__}")
    _check_required(obj)  # clearer reasons than msgspec's for these
    unknown = {k: v for k, v in obj.items() if k not in _WIRE_NAMES}
    for name in unknown:
        del obj[name]
    try:
        return msgspec.convert(obj, _Wire), unknown
    except msgspec.ValidationError as exc:
        raise SerializationError(f"invalid CloudEvent: {exc}") from exc


def _decode_attr(name: str, text: str) -> dict[str, Any]:
    """Decode one of our JSON-object-in-a-string attributes, naming it on failure."""
    try:
        return _object_decode(text)
    except _PARSE_ERRORS as exc:
        raise SerializationError(f"attribute '{name}' is not a JSON object string: {exc}") from exc


def _binary_data(w: _Wire) -> bytes:
    """Return `data_base64`, which the spec makes exclusive with `data`."""
    if w.data is not None:
        raise SerializationError("both 'data' and 'data_base64' are present")
    return w.data_base64 or b""


def _loom_attrs(w: _Wire, values: dict[str, Any], extras: dict[str, Any]) -> None:
    """Apply `loomextra` (null/empty attributes, extras JSON cannot carry at the top level)."""
    if w.extensions is not _UNSET:
        # Only non-loom-ha producers (e.g. upstream Loom's model_dump_json) write a top-level
        # `extensions`; for them loomext/loomextra are ordinary extra fields.
        for name, value in (("loomext", w.loomext), ("loomextra", w.loomextra)):
            if value is not None:
                extras[name] = value
        return
    for name, value in _decode_attr("loomextra", w.loomextra or "{}").items():
        if name in _NULLABLE:
            if value is not None and not isinstance(value, str):
                raise SerializationError(f"loomextra: '{name}' must be a string or null")
            values[name] = value
        elif name in _FIELD_SET:
            raise SerializationError(f"loomextra must not carry '{name}'")
        else:
            extras[name] = value
