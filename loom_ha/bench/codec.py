"""Micro-benchmark: the event codec against pydantic's JSON round trip (for `loom-ha bench`)."""

from __future__ import annotations

import timeit
from typing import Any

from loom_ha.event import EventCodec, loom_event_class

_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def codec_benchmark(n: int = 20000, *, rounds: int = 5) -> dict[str, float]:
    """Return µs per event for our codec and for naive pydantic JSON, on a typical Loom request.

    The event is Loom's class (ours if loom-agent is missing): `node.request` with small dict
    data, a subject, a traceparent and one extension. Each figure is the best of `rounds` runs
    of `n` iterations, so it measures the code rather than the machine's noise.

    Returns:
        Keys `ours_encode`, `ours_decode`, `ours_total`, `pydantic_dump`, `pydantic_validate`,
        `pydantic_total`.
    """
    cls: Any = loom_event_class()
    event = cls.create(
        source="/node/a",
        type="node.request",
        data={"task": "hello", "n": 1},
        subject="node/b",
        traceparent=_TRACEPARENT,
    )
    event.extensions["timeout"] = 30.0
    codec = EventCodec(cls)
    wire = codec.encode(event)
    dumped = event.model_dump_json()

    cases = {
        "ours_encode": lambda: codec.encode(event),
        "ours_decode": lambda: codec.decode(wire),
        "pydantic_dump": event.model_dump_json,
        "pydantic_validate": lambda: cls.model_validate_json(dumped),
    }
    best = dict.fromkeys(cases, float("inf"))
    # Interleaved rounds, best of each: a shared machine's slow spells then hit every case alike.
    for _ in range(rounds):
        for name, stmt in cases.items():
            best[name] = min(best[name], timeit.timeit(stmt, number=n) / n * 1e6)
    ours_encode, ours_decode = best["ours_encode"], best["ours_decode"]
    pydantic_dump, pydantic_validate = best["pydantic_dump"], best["pydantic_validate"]
    return {
        "ours_encode": ours_encode,
        "ours_decode": ours_decode,
        "ours_total": ours_encode + ours_decode,
        "pydantic_dump": pydantic_dump,
        "pydantic_validate": pydantic_validate,
        "pydantic_total": pydantic_dump + pydantic_validate,
    }
