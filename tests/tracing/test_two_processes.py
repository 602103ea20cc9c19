"""One trace across two processes over a real broker: HALoomApp.run in this process, the node
in another, each with its own SDK tracer provider and in-memory exporter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loom_ha.loom import HALoomApp, loom_transport
from loom_ha.tracing import SpanRecord, render_span_tree

from ._spans import Spans

NODE = Path(__file__).with_name("traced_node.py")


@pytest.fixture(
    params=[
        pytest.param("redis-streams", marks=pytest.mark.redis),
        pytest.param("nats-core", marks=pytest.mark.nats),
    ]
)
def url(request: pytest.FixtureRequest) -> str:
    broker, mode = request.param.split("-")
    server = request.getfixturevalue("redis_server" if broker == "redis" else "nats_server")
    return f"{server.url}?mode={mode}"


def _node_spans(url: str, spans_file: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(NODE), url, str(spans_file)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        proc.wait()
        pytest.fail(f"traced node did not start (got {line!r})")
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def test_a_run_through_another_process_is_one_trace(
    spans: Spans, url: str, tmp_path: Path
) -> None:
    """app.run → request → node process → reply → caller: five spans, one trace, each
    under the span that caused it, whichever process started it."""
    spans_file = tmp_path / "node-spans.json"
    node = _node_spans(url, spans_file)
    transport = loom_transport(url)
    try:
        app = HALoomApp(transport=transport)
        assert await app.run("hi", target="node/echo") == "echo:hi"
        await spans.wait_for(3)  # run, its request's publish, the reply's delivery
    finally:
        await transport.close()
        _stop(node)
    assert node.returncode == 0
    theirs = [SpanRecord(**r) for r in json.loads(spans_file.read_text())]
    ours = spans.records()
    every = ours + theirs
    print("\n" + render_span_tree(every))

    assert len({r.trace_id for r in every}) == 1, "not one trace"
    by_name = {(r.service, r.name): r for r in every}
    assert sorted(by_name) == sorted(
        [
            ("client", "run node/echo"),
            ("client", "publish node.request/node/echo"),
            ("node", "process node.request/node/echo"),
            ("node", "publish node.response/node/echo"),
            ("client", "process node.response/node/echo"),
        ]
    )
    chain = [by_name[key] for key in [
        ("client", "run node/echo"),
        ("client", "publish node.request/node/echo"),
        ("node", "process node.request/node/echo"),
        ("node", "publish node.response/node/echo"),
        ("client", "process node.response/node/echo"),
    ]]  # fmt: skip
    assert chain[0].parent_id is None
    assert [c.parent_id for c in chain[1:]] == [p.span_id for p in chain[:-1]]
    assert [c.kind for c in chain] == ["internal", "producer", "consumer", "producer", "consumer"]
