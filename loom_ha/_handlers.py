"""Who receives what: the handler table, group round robin, and isolated handler calls.

Every backend shares this module so that delivery rules are identical everywhere:

* A *subscription key* is ``(pattern, group)``; a backend creates one native
  subscription per key (a Redis channel/pattern, a NATS subject + queue group).
* A handler on several overlapping fan-out patterns gets each event once: only its
  *owner* key (the smallest matching pattern, by its raw string) delivers to it.
* Handlers that share a key with a group compete: each event goes to one of them
  (round robin inside the process; the broker already picked this process).
* Handlers run isolated: sync or async, exceptions logged with topic and event id,
  counted, and never allowed to stop delivery to anyone else.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, TypeAlias

from loom_ha._tasks import TaskSupervisor
from loom_ha.topics import TopicPattern, parse_pattern
from loom_ha.tracing import start_delivery

log = logging.getLogger("loom_ha.handlers")

Handler: TypeAlias = Callable[[Any], Awaitable[None] | None]
"""Receives one event; may be a plain function or a coroutine function."""


@dataclass(frozen=True, slots=True)
class SubscriptionKey:
    """One native subscription: a pattern, and the group that competes on it (None: fan-out)."""

    pattern: TopicPattern
    group: str | None
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Keys are looked up for every delivered event: hash once, not per lookup.
        object.__setattr__(self, "_hash", hash((self.pattern.raw, self.group)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def raw(self) -> str:
        """The pattern as the caller wrote it."""
        return self.pattern.raw


@dataclass(slots=True)
class DeliveryCounters:
    """Counters every backend keeps; read through `Transport.statistics()`."""

    published: int = 0
    delivered: int = 0
    handler_errors: int = 0
    filtered: int = 0  # arrived on a wider native subscription, rejected by the shared matcher
    malformed: int = 0
    dead_lettered: int = 0
    redelivered: int = 0


async def invoke(
    handler: Handler,
    topic: str,
    event: Any,
    counters: DeliveryCounters,
    task: asyncio.Task[Any] | None = None,
) -> BaseException | None:
    """Call `handler` with `event`, awaiting only what is awaitable: the one way every
    backend calls a handler.

    Returns None when the handler succeeded, else what it raised (a dead letter says
    why). Exceptions are logged and counted, never raised. `CancelledError` propagates
    when the calling task is being cancelled, also when the handler swallowed it; one the
    handler raised on its own (it awaited something that was cancelled) is a handler
    error like any other, so it cannot end a delivery loop. With a tracer provider set, the
    call runs inside its delivery span (`loom_ha.tracing`). `task` is the calling task when
    the caller knows it (looking it up per event is not free on Python 3.11).
    """
    traced = start_delivery(topic, event, handler)  # None unless a tracer provider is set
    try:
        result = handler(event) if traced is None else traced(event)
        # Most handlers are coroutine functions: skip isawaitable()'s ABC checks for them.
        if result is not None and (type(result) is CoroutineType or inspect.isawaitable(result)):
            await result
    except Exception as exc:
        _handler_failed(handler, topic, event, counters)
        raise_swallowed_cancellation(task)
        return exc
    except asyncio.CancelledError as exc:
        task = task or asyncio.current_task()
        if task is None or task.cancelling():
            raise
        _handler_failed(handler, topic, event, counters)
        return exc
    raise_swallowed_cancellation(task)
    counters.delivered += 1
    return None


def raise_swallowed_cancellation(task: asyncio.Task[Any] | None = None) -> None:
    """Re-raise a cancellation of the calling task that a handler caught and dropped.

    A handler that swallows `CancelledError` (Loom 0.3.4's `Node._handle_request` does,
    when Python 3.11's `asyncio.wait_for` loses it) would otherwise keep its delivery
    task alive, and `disconnect()` would wait for it forever. The task's `cancelling()`
    count still says a cancellation was requested: honour it here. `task`: the calling task,
    when the caller already has it.
    """
    task = task or asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _handler_failed(handler: Handler, topic: str, event: Any, counters: DeliveryCounters) -> None:
    counters.handler_errors += 1
    log.exception(
        "handler %r failed on topic %r, event id %r", handler, topic, getattr(event, "id", None)
    )


@dataclass(slots=True)
class _KeyMembers:
    key: SubscriptionKey
    handlers: list[Handler] = field(default_factory=list)
    next_index: int = 0
    # Fan-out keys whose handlers have no other key own every event they receive:
    # `recipients()` returns this tuple without asking each handler's owner key.
    always: tuple[Handler, ...] | None = None
    # The key's only handler, when it has no other key: it gets every event of the key.
    sole: Handler | None = None


class HandlerTable:
    """Subscriptions of one transport: keys, their handlers, and who gets an event."""

    def __init__(self) -> None:
        self._members: dict[SubscriptionKey, _KeyMembers] = {}
        self._keys_of: dict[Handler, list[SubscriptionKey]] = {}
        self._exact: dict[str, list[SubscriptionKey]] = {}
        self._wildcards: list[SubscriptionKey] = []

    def add(
        self, pattern: str, handler: Handler, group: str | None
    ) -> tuple[SubscriptionKey, bool]:
        """Record a subscription; returns its key and whether the key is new.

        Subscribing the same handler to the same key twice is a no-op.
        """
        key = SubscriptionKey(parse_pattern(pattern), group)
        members = self._members.get(key)
        is_new = members is None
        if members is None:
            members = self._members[key] = _KeyMembers(key)
            if key.pattern.is_wildcard:
                self._wildcards.append(key)
            else:
                self._exact.setdefault(key.pattern.fixed, []).append(key)
        key = members.key  # one object per key: identity comparisons on the hot path
        if handler not in members.handlers:
            members.handlers.append(handler)
            self._keys_of.setdefault(handler, []).append(key)
            self._refresh(handler)
        return key, is_new

    def remove(self, pattern: str, handler: Handler) -> list[SubscriptionKey]:
        """Drop every subscription of `handler` on `pattern` (any group).

        Returns the keys left without handlers (the backend drops their native
        subscriptions). An unknown handler or pattern is a no-op.
        """
        parsed = parse_pattern(pattern)
        emptied: list[SubscriptionKey] = []
        for key in [k for k in self._keys_of.get(handler, []) if k.pattern == parsed]:
            members = self._members[key]
            members.handlers.remove(handler)
            self._keys_of[handler].remove(key)
            if not members.handlers:
                self._drop_key(key)
                emptied.append(key)
            else:
                self._refresh_key(members)
        if not self._keys_of.get(handler, True):
            del self._keys_of[handler]
        else:
            self._refresh(handler)
        return emptied

    def _refresh(self, handler: Handler) -> None:
        """Recompute the `always` tuples of every key `handler` is on (its key count changed)."""
        for key in self._keys_of.get(handler, ()):
            self._refresh_key(self._members[key])

    def _refresh_key(self, members: _KeyMembers) -> None:
        keys_of, handlers = self._keys_of, members.handlers
        alone = [h for h in handlers if len(keys_of[h]) == 1]
        every = len(alone) == len(handlers)
        members.always = tuple(handlers) if members.key.group is None and every else None
        members.sole = handlers[0] if len(handlers) == 1 and alone else None

    def _drop_key(self, key: SubscriptionKey) -> None:
        del self._members[key]
        if key.pattern.is_wildcard:
            self._wildcards.remove(key)
        else:
            same = self._exact[key.pattern.fixed]
            same.remove(key)
            if not same:
                del self._exact[key.pattern.fixed]

    def clear(self) -> None:
        """Forget every subscription."""
        self.__init__()  # type: ignore[misc]

    def keys(self) -> list[SubscriptionKey]:
        """Every live key, in subscription order."""
        return list(self._members)

    def has_handler(self, handler: Handler) -> bool:
        """True while `handler` has at least one subscription."""
        return handler in self._keys_of

    @property
    def handler_count(self) -> int:
        """Distinct handlers with at least one subscription."""
        return len(self._keys_of)

    def sole(self, key: SubscriptionKey) -> Handler | None:
        """The handler that receives every event of `key` and no other key's, if any."""
        members = self._members.get(key)
        return None if members is None else members.sole

    def keys_matching(self, topic: str) -> list[SubscriptionKey]:
        """Keys whose pattern covers `topic` (what a broker would deliver to)."""
        found = list(self._exact.get(topic, ()))
        found.extend(k for k in self._wildcards if k.pattern.matches(topic))
        return found

    def recipients(self, key: SubscriptionKey, topic: str) -> Sequence[Handler]:
        """Handlers that get an event that arrived for `key` on `topic`.

        Group keys yield one member (round robin). Fan-out keys yield each handler
        whose owner key for this topic is `key`, so overlapping patterns deliver once.
        """
        members = self._members.get(key)
        if members is None or not members.handlers:
            return ()
        if members.always is not None:
            return members.always
        if key.group is not None:
            handlers = members.handlers
            chosen = handlers[members.next_index % len(handlers)]
            members.next_index += 1
            return (chosen,)
        key = members.key
        return [h for h in members.handlers if self._owner_key(h, topic) is key]

    def _owner_key(self, handler: Handler, topic: str) -> SubscriptionKey | None:
        keys = self._keys_of.get(handler, ())
        if len(keys) == 1:
            return keys[0]
        candidates = [k for k in keys if k.group is None and k.pattern.matches(topic)]
        return min(candidates, key=lambda k: k.raw) if candidates else None


class Mailbox:
    """A handler's serial delivery queue: keeps per-topic order, isolates slow handlers.

    Each handler gets one worker task once an event is queued for it (owned by the
    transport's supervisor), so a handler awaiting a nested request never blocks
    delivery to anyone else. A
    backend that already runs one serial task per subscription key may instead call
    the handler in that task (`enter_here` ... `leave_here`) while nothing of it is
    queued or running: the worker then waits until that call is over, so the handler
    still never runs twice at once and its events keep their order.
    """

    def __init__(
        self, handler: Handler, supervisor: TaskSupervisor, counters: DeliveryCounters
    ) -> None:
        self._handler = handler
        self._counters = counters
        # A deque and a bare future instead of asyncio.Queue or an Event: put() only
        # wakes the worker when it is idle, and the worker drains a burst without a
        # wake-up per event (this is the hot path of every backend).
        self._items: deque[tuple[str, Any]] = deque()
        self._idle: asyncio.Future[None] | None = None
        self._working = False  # the worker is inside the handler
        self._here = False  # a delivery task is inside the handler (enter_here)
        # Started by the first event: a backend that calls handlers in its own serial task
        # (Redis Streams, JetStream) never feeds a mailbox, and then has no idle worker.
        self._task: asyncio.Task[None] | None = None
        self._supervisor = supervisor

    def put(self, topic: str, event: Any) -> None:
        """Queue one event; never blocks (the queue is unbounded, see `depth`)."""
        self._items.append((topic, event))
        if self._task is None:
            self._task = self._supervisor.spawn(self._run(), name=f"mailbox:{self._handler!r}")
            return  # it starts with the queue as it is
        self._wake()

    def _wake(self) -> None:
        idle = self._idle
        if idle is not None:
            self._idle = None
            if not idle.done():
                idle.set_result(None)

    @property
    def depth(self) -> int:
        """Events waiting for this handler."""
        return len(self._items)

    def enter_here(self) -> bool:
        """True when the calling delivery task may call the handler itself now; False while
        events wait or the handler runs (the event must queue behind them: `put`)."""
        if self._here or self._working or self._items:
            return False
        self._here = True
        return True

    def leave_here(self) -> None:
        """That call is over; the worker takes events queued meanwhile."""
        self._here = False
        if self._items:
            self._wake()

    async def _run(self) -> None:
        items, handler, counters = self._items, self._handler, self._counters
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while True:
            if not items or self._here:
                self._idle = idle = loop.create_future()
                await idle
                continue
            topic, event = items.popleft()
            self._working = True
            try:
                await invoke(handler, topic, event, counters, me)
            finally:
                self._working = False

    async def close(self) -> None:
        """Stop the worker; queued events are dropped (the handler unsubscribed)."""
        if self._task is not None:
            await self._supervisor.cancel(self._task)
