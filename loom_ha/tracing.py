"""OpenTelemetry tracing: spans for publishes, handler deliveries and routed request attempts.

Trace context travels in each CloudEvent as the distributed-tracing extension attributes
``traceparent`` and ``tracestate`` (W3C Trace Context), so a request and its reply through any
broker and any process are one trace. OpenTelemetry is optional (the ``otel`` extra): this
module imports it only once the application has, and while no tracer provider is configured
each hook costs one check.

Applications use `use_tracer_provider` (rarely: the global provider is followed) and
`span_records` / `render_span_tree`; the hooks (`start_publish`, `start_delivery`,
`start_attempt`, `operation`) are called by loom-ha's own layers. Guide: docs/tracing.md.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "TRACER_NAME",
    "SpanRecord",
    "render_span_tree",
    "span_records",
    "use_tracer_provider",
]

log = logging.getLogger("loom_ha.tracing")

TRACER_NAME = "loom_ha"
"""The instrumentation scope of every span loom-ha starts."""

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"  # the CloudEvents extension attributes
_TRACE_MODULE = "opentelemetry.trace"
_modules = sys.modules
_OFF: AbstractContextManager[None] = contextlib.nullcontext()


class _Api:
    """The OpenTelemetry names the hooks use, imported once tracing is on."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.propagator = TraceContextTextMapPropagator()
        self.attach, self.detach, self.empty = context.attach, context.detach, context.Context
        self.current_span, self.in_context = trace.get_current_span, trace.set_span_in_context
        self.use_span, self.kinds = trace.use_span, trace.SpanKind
        self.status, self.error = trace.Status, trace.StatusCode.ERROR


class _Tracing:
    """Which tracer the hooks use: the one `use_tracer_provider()` gave, else OpenTelemetry's
    global provider's (set at most once per process, so a real one, once seen, is kept).

    While tracing is off the hooks make one dict lookup, ``seen.get(key)``, which stays None
    until something changes: first ``sys.modules`` for ``opentelemetry.trace`` (nobody can set
    a provider before importing the API), then that module's provider slot (asking the API,
    `get_tracer_provider`, would cost ~1 µs per event: it checks os.environ each time).
    """

    __slots__ = ("api", "key", "seen", "tracer", "unwritable")

    def __init__(self) -> None:
        self.tracer: Tracer | None = None  # None: tracing is off (for now)
        self.api: _Api | None = None
        self.unwritable: set[type] = set()  # event classes already warned about
        self.seen: dict[str, Any] = _modules  # where the hooks look while tracing is off...
        self.key = _TRACE_MODULE  # ...and for what: None there means "still off"

    def probe(self) -> Tracer | None:
        """What the hooks watch changed: take the global provider's tracer, if it is real."""
        trace = _modules.get(_TRACE_MODULE)
        if trace is None:
            return None
        provider = trace.get_tracer_provider()  # also honours OTEL_PYTHON_TRACER_PROVIDER
        if isinstance(provider, trace.ProxyTracerProvider):  # imported, not configured yet
            slot = vars(trace)
            if "_TRACER_PROVIDER" in slot:  # else (OTel reshaped): probe on every event
                self.seen, self.key = slot, "_TRACER_PROVIDER"
            return None
        if isinstance(provider, trace.NoOpTracerProvider):
            self.seen, self.key = {}, ""  # configured as off, and it can be set only once
            return None
        return self.use(provider)

    def use(self, provider: TracerProvider) -> Tracer:
        """Trace with `provider` from now on."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            own_version: str | None = version("loom-ha")
        except PackageNotFoundError:
            own_version = None
        self.api = self.api or _Api()
        self.tracer = provider.get_tracer(TRACER_NAME, own_version)
        return self.tracer


_state = _Tracing()


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Trace loom-ha with `provider` instead of OpenTelemetry's global one.

    Without this call loom-ha follows the global provider (`opentelemetry.trace.
    set_tracer_provider`), which is what applications normally configure. ``None`` goes back
    to following it; a `NoOpTracerProvider` turns loom-ha's spans off. Meant for start-up
    (and tests): spans already started are not moved.
    """
    from opentelemetry.trace import NoOpTracerProvider

    _state.tracer = None
    if provider is None:
        _state.seen, _state.key = _modules, _TRACE_MODULE
    elif isinstance(provider, NoOpTracerProvider):
        _state.seen, _state.key = {}, ""
    else:
        _state.use(provider)


# -- hooks (each returns at once, with None, while tracing is off) ----------------------------


def tracing_active() -> bool:
    """True when the hooks record spans (asked the way they ask): batch paths that skip the
    per-event hooks use it to fall back to them."""
    return _state.tracer is not None or (
        _state.seen.get(_state.key) is not None and _state.probe() is not None
    )


def start_publish(topic: str, event: Any) -> Span | None:
    """Start the PRODUCER span of publishing `event` on `topic`, and write its context into the
    event's ``traceparent`` / ``tracestate``. End it with `end_span`.

    Its parent is the current span, else the context the event already carries (a forwarded
    event), else none (a new trace).
    """
    tracer = _state.tracer
    if tracer is None and (
        _state.seen.get(_state.key) is None or (tracer := _state.probe()) is None
    ):
        return None
    api = _api()
    parent = None if api.current_span().get_span_context().is_valid else _carried(event)
    span = tracer.start_span(
        f"publish {topic}", parent, api.kinds.PRODUCER, _attributes("send", topic, event)
    )
    _inject(span, event)
    return span


class Delivery:
    """One handler call inside its CONSUMER span (the current span while the handler runs):
    awaiting ``delivery(event)`` calls the handler, marks the span failed if it raises, and
    ends the span."""

    __slots__ = ("handler", "span")

    def __init__(self, span: Span, handler: Callable[[Any], Any]) -> None:
        self.span, self.handler = span, handler

    async def __call__(self, event: Any) -> None:
        api = _api()
        token = api.attach(api.in_context(self.span))
        try:
            result = self.handler(event)
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:
            _failed(self.span, exc)
            raise
        finally:
            api.detach(token)
            self.span.end()


def start_delivery(topic: str, event: Any, handler: Callable[[Any], Any]) -> Delivery | None:
    """Start the CONSUMER span of handing `event` to `handler`; await the returned
    `Delivery` with the event instead of calling the handler.

    Its parent is the context the event carries (its publisher's span), never the task's own
    context: a delivery task outlives whatever span was current when it was started.
    """
    tracer = _state.tracer
    if tracer is None and (
        _state.seen.get(_state.key) is None or (tracer := _state.probe()) is None
    ):
        return None
    api = _api()
    span = tracer.start_span(
        f"process {topic}",
        _carried(event),
        api.kinds.CONSUMER,
        _attributes("process", topic, event),
    )
    return Delivery(span, handler)


def capture() -> Context | None:
    """The current context, for work that goes on in another task (None: tracing is off)."""
    tracer = _state.tracer
    if tracer is None and (_state.seen.get(_state.key) is None or _state.probe() is None):
        return None
    from opentelemetry.context import get_current

    return get_current()


def start_attempt(
    parent: Context | None, topic: str, event: Any, instance: str, attempt: int
) -> Span | None:
    """Start the span of one routed attempt of a request (`capture()` gave `parent`); it lasts
    until the attempt's outcome is known. Make it current with `activated` while sending.

    The event carries it too, in case no publish span (HATransport) follows below.
    """
    tracer = _state.tracer
    if parent is None or tracer is None:
        return None
    attributes: dict[str, str | int] = {
        "messaging.destination.name": topic,
        "loom_ha.instance_id": instance,
        "loom_ha.attempt": attempt,
    }
    span = tracer.start_span(f"attempt {topic}", parent, _api().kinds.INTERNAL, attributes)
    _inject(span, event)
    return span


def activated(span: Span | None) -> AbstractContextManager[Any]:
    """Make `span` the current span inside ``with`` (it stays open afterwards)."""
    if span is None:
        return _OFF
    return _api().use_span(span, record_exception=False, set_status_on_exception=False)


def operation(name: str, attributes: dict[str, str]) -> AbstractContextManager[Any]:
    """A span around an operation of the caller's (Loom's ``app.run``), current inside ``with``;
    exceptions mark it failed."""
    tracer = _state.tracer
    if tracer is None and (
        _state.seen.get(_state.key) is None or (tracer := _state.probe()) is None
    ):
        return _OFF
    return tracer.start_as_current_span(name, attributes=attributes)


def end_span(span: Span | None, error: BaseException | str | None = None) -> None:
    """End `span` (no-op for None); an `error` marks it failed."""
    if span is not None:
        if error is not None:
            _failed(span, error)
        span.end()


def _api() -> _Api:
    api = _state.api
    assert api is not None, "set together with the tracer"
    return api


def _attributes(operation: str, topic: str, event: Any) -> dict[str, str]:
    """Messaging and CloudEvents semantic-convention attributes of one publish or delivery:
    few, as the SDK checks each one (~1-2 µs apiece). Source and id identify the event."""
    return {
        "messaging.operation.type": operation,
        "messaging.destination.name": topic,
        "messaging.message.id": str(getattr(event, "id", "")),
        "cloudevents.event_source": str(getattr(event, "source", "")),
    }


def _carried(event: Any) -> Context:
    """The trace context `event` carries, on an empty base (a new trace if it carries none)."""
    carrier = {}
    for name, value in (
        (TRACEPARENT, getattr(event, TRACEPARENT, None)),
        (TRACESTATE, _state_of(event)),
    ):
        if isinstance(value, str):
            carrier[name] = value
    api = _api()
    return api.propagator.extract(carrier, api.empty())


def _inject(span: Span, event: Any) -> None:
    """Write `span`'s context into the event (W3C propagator); a stale ``tracestate`` goes."""
    carrier: dict[str, str] = {}
    api = _api()
    api.propagator.inject(carrier, api.in_context(span))
    _write(event, carrier)


def _write(event: Any, carrier: dict[str, str]) -> None:
    traceparent = carrier.get(TRACEPARENT)
    if traceparent is None:
        return  # the span has no valid context (a no-op tracer): leave the event's alone
    try:
        event.traceparent = traceparent
        state = carrier.get(TRACESTATE)
        if state is not None:
            setattr(event, TRACESTATE, state)
        elif _state_of(event) is not None:
            delattr(event, TRACESTATE)
    except (AttributeError, TypeError, ValueError) as exc:
        kind = type(event)
        if kind not in _state.unwritable:
            _state.unwritable.add(kind)
            log.warning("cannot write trace context into %s events: %s", kind.__name__, exc)


def _state_of(event: Any) -> Any:
    """The event's ``tracestate`` (an extra field of Loom's model), read without pydantic's
    slow path for a missing attribute."""
    extra = getattr(event, "__pydantic_extra__", None) or {}
    return extra.get(TRACESTATE) or getattr(event, "__dict__", {}).get(TRACESTATE)


def _failed(span: Span, error: BaseException | str) -> None:
    api = _api()
    if isinstance(error, BaseException):
        span.record_exception(error)
        error = f"{type(error).__name__}: {error}"
    span.set_status(api.status(api.error, error))


# -- seeing a trace without a tracing backend -------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SpanRecord:
    """One finished span, as plain JSON-able values (to ship across processes, or render)."""

    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str | None
    kind: str  # "internal", "producer", "consumer", ...
    service: str  # the resource's service.name
    start_ns: int
    end_ns: int
    status: str  # "unset", "ok", "error"


def span_records(spans: Iterable[Any]) -> list[SpanRecord]:
    """`SpanRecord`s of finished SDK spans (``InMemorySpanExporter().get_finished_spans()``)."""
    records = []
    for span in spans:
        context, parent = span.context, span.parent
        records.append(
            SpanRecord(
                name=span.name,
                trace_id=f"{context.trace_id:032x}",
                span_id=f"{context.span_id:016x}",
                parent_id=None if parent is None else f"{parent.span_id:016x}",
                kind=span.kind.name.lower(),
                service=str(span.resource.attributes.get("service.name", "?")),
                start_ns=span.start_time or 0,
                end_ns=span.end_time or 0,
                status=span.status.status_code.name.lower(),
            )
        )
    return records


def render_span_tree(records: Iterable[SpanRecord]) -> str:
    """Draw spans as one indented tree per trace, children in start order.

    Each line reads ``name  [service, kind, duration]``; a span whose parent is not among
    `records` is drawn as a root.
    """
    spans = sorted(records, key=lambda r: r.start_ns)
    ids = {r.span_id for r in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for r in spans:
        children.setdefault(r.parent_id if r.parent_id in ids else None, []).append(r)
    lines: list[str] = []

    def draw(record: SpanRecord, lead: str, branch: str) -> None:
        ms = (record.end_ns - record.start_ns) / 1e6
        failed = ", error" if record.status == "error" else ""
        lines.append(f"{lead}{branch}{record.name}  [{record.service}, {record.kind}, "
                     f"{ms:.2f} ms{failed}]")  # fmt: skip
        kids = children.get(record.span_id, [])
        below = lead + ("" if not branch else "    " if branch == "└── " else "│   ")
        for i, kid in enumerate(kids):
            draw(kid, below, "└── " if i == len(kids) - 1 else "├── ")

    for trace_id in dict.fromkeys(r.trace_id for r in children.get(None, [])):
        lines.append(f"trace {trace_id}")
        for root in (r for r in children.get(None, []) if r.trace_id == trace_id):
            draw(root, "", "")
    return "\n".join(lines)
