"""Error mapping and option validation of the NATS backends (no server)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import nats.errors
import nats.js.errors
import pytest

from loom_ha.errors import (
    ConfigurationError,
    ConnectionLostError,
    LoomHAError,
    PublishError,
    TransientError,
)
from loom_ha.nats import ConsumerOptions, JetStreamTransport, NatsCoreTransport, StreamOptions
from loom_ha.nats._errors import map_nats_errors, translate


def _nats_error_classes() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for module in (nats.errors, nats.js.errors):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, nats.errors.Error):
                found.append(cls)
    return found


@pytest.mark.parametrize("cls", _nats_error_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_nats_error_is_mapped(cls: type[BaseException]) -> None:
    """Each nats-py exception class becomes a loom-ha error, chained to the original."""
    try:
        exc = cls()
    except TypeError:  # needs arguments (e.g. a message): build it bare
        exc = cls.__new__(cls)
        Exception.__init__(exc, "boom")
    with pytest.raises(LoomHAError) as caught, map_nats_errors(what="test"):
        raise exc
    assert caught.value.__cause__ is exc


def test_lost_connections_are_transient_and_publish_refusals_are_not() -> None:
    """Timeouts and closed connections may be retried; a refused publish may not."""
    with pytest.raises(ConnectionLostError) as lost, map_nats_errors():
        raise nats.errors.ConnectionClosedError
    assert isinstance(lost.value, TransientError)
    with pytest.raises(PublishError) as refused, map_nats_errors(topic="t", event_id="e1"):
        raise nats.errors.MaxPayloadError
    assert refused.value.topic == "t" and refused.value.event_id == "e1"


@pytest.mark.parametrize(
    ("servers", "options", "named"),
    [
        (["http://127.0.0.1:4222"], {}, "scheme"),
        (["nats://127.0.0.1:99999"], {}, "port"),
        (["nats://:4222"], {}, "host"),
        (["nats://h:4222/path"], {}, "path"),
        ([], {}, "servers"),
        (["nats://h:4222"], {"user": "u"}, "password"),
        (["nats://h:4222"], {"token": "t", "user": "u", "password": "p"}, "token"),
        (["nats://h:4222"], {"nkeys_seed": "/a.nk", "user_credentials": "/b"}, "one of user/pas"),
        (["nats://u:p@h:4222"], {"user_credentials": "/b.creds"}, "user/password and user_cred"),
        (["nats://h:4222"], {"nkeys_seed": ""}, "nkeys_seed: an empty path"),
        (["nats://h:4222"], {"user_credentials": "eyJ0.eyJ1.c2ln"}, "path of a file, not its"),
        (["nats://h:4222"], {"reconnect_wait": 0}, "reconnect_wait"),
        (["nats://h:4222"], {"max_reconnect_attempts": 0}, "max_reconnect_attempts"),
        (["nats://h:4222"], {"colour": "blue"}, "colour"),
    ],
)
def test_bad_options_fail_at_construction(
    servers: list[str], options: dict[str, object], named: str
) -> None:
    """Bad URLs and options raise ConfigurationError naming the bad part."""
    with pytest.raises(ConfigurationError, match=named):
        NatsCoreTransport(servers, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: StreamOptions(name="has space"),
        lambda: StreamOptions(replicas=7),
        lambda: StreamOptions(name="X", dead_letter_stream="X"),
        lambda: ConsumerOptions(heartbeat=5, pull_expires=6),
        lambda: ConsumerOptions(start="latest"),  # type: ignore[arg-type]
    ],
)
def test_bad_jetstream_options_fail_at_construction(make: object) -> None:
    """Invalid stream and consumer options raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        make()  # type: ignore[operator]


def test_jetstream_rejects_bad_timeouts() -> None:
    """A non-positive publish timeout is refused."""
    with pytest.raises(ConfigurationError, match="publish_timeout"):
        JetStreamTransport(publish_timeout=0)


def test_importing_loom_ha_does_not_import_nats() -> None:
    """`import loom_ha` (and its transport contract) leaves the nats client unloaded."""
    code = "import sys, loom_ha, loom_ha.transport, loom_ha.memory; print('nats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_translate_returns_what_the_block_would_raise() -> None:
    """`translate` (for a held exception: a failed ack future) and `map_nats_errors` (for a
    block) map alike; a non-nats error is returned unchanged."""
    for exc, kwargs in (
        (nats.errors.ConnectionClosedError(), {}),
        (nats.errors.AuthorizationError(), {}),
        (nats.errors.Error("refused"), {"topic": "t", "event_id": "e1"}),
        (nats.errors.Error("refused"), {}),
    ):
        mapped = translate(exc, what="test", **kwargs)
        with pytest.raises(LoomHAError) as caught, map_nats_errors(what="test", **kwargs):
            raise exc
        assert (type(mapped), str(mapped), mapped.__cause__) == (
            type(caught.value),
            str(caught.value),
            exc,
        )
    other = ValueError("not nats")
    assert translate(other) is other
