"""Subject encoding, native wildcard mapping and ack subjects of the NATS backends (no server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from loom_ha.errors import ConfigurationError
from loom_ha.nats._consumer import _delivery_of
from loom_ha.nats.subjects import SubjectCodec, decode_token, encode_token
from loom_ha.topics import parse_pattern

_ILLEGAL = set(" \t\r\n.*>")


@pytest.mark.parametrize(
    ("topic", "subject"),
    [
        ("node.request/node/agent_1", "loom.node~2Erequest.node.agent_1"),
        ("a//b", "loom.a.~.b"),
        ("with space/ü", "loom.with~20space.~C3~BC"),
        ("x/", "loom.x.~"),
        ("~", "loom.~7E"),
    ],
)
def test_documented_examples(topic: str, subject: str) -> None:
    """The examples in the module docstring and docs/nats.md hold."""
    codec = SubjectCodec()
    assert codec.subject(topic) == subject
    assert codec.topic(subject) == topic


@given(st.text(min_size=1))
def test_any_topic_round_trips_to_a_legal_subject(topic: str) -> None:
    """Every topic maps to a NATS-legal subject that decodes to the same topic."""
    codec = SubjectCodec()
    subject = codec.subject(topic)
    tokens = subject.split(".")
    assert all(t and not _ILLEGAL & set(t) for t in tokens) and subject.isascii()
    assert codec.topic(subject) == topic


@pytest.mark.parametrize("token", ["~", "a~zz", "a b", "~C3", ""])
def test_foreign_tokens_are_rejected(token: str) -> None:
    """Tokens encode_token never produces fail to decode instead of guessing."""
    if token == "~":
        assert decode_token(token) == ""
        return
    with pytest.raises(ValueError):
        decode_token(token)


@pytest.mark.parametrize(
    ("pattern", "native"),
    [
        ("a/b", "loom.a.b"),
        ("a/b/*", "loom.a.b.>"),
        ("a/b*", "loom.a.>"),
        ("ab*", "loom.>"),
        ("*", "loom.>"),
        ("*/node/echo", "loom.>"),
        ("node.request/*", "loom.node~2Erequest.>"),
    ],
)
def test_patterns_map_to_the_narrowest_native_subject(pattern: str, native: str) -> None:
    """Exact topics are exact subjects; prefixes use their complete tokens and '>'."""
    assert SubjectCodec().native(parse_pattern(pattern)) == native


@given(st.text(min_size=0, max_size=12), st.text(min_size=0, max_size=12))
def test_native_subject_covers_every_match(fixed: str, tail: str) -> None:
    """Whatever a prefix pattern matches is inside its native subscription."""
    fixed = fixed.replace("*", "")
    codec = SubjectCodec()
    native = codec.native(parse_pattern(fixed + "*"))
    subject = codec.subject((fixed + tail.replace("*", "")) or "x")
    if not (fixed + tail):
        return
    head = native[:-1]  # strip '>'
    assert subject.startswith(head) and len(subject) > len(head)


def test_encoding_is_cached_token_by_token() -> None:
    """Encoding a token twice gives the same string (and is a pure function)."""
    assert encode_token("日本語") == encode_token("日本語") == "~E6~97~A5~E6~9C~AC~E8~AA~9E"


@pytest.mark.parametrize(
    ("prefix", "dead"), [("lo om", "loomdlq"), ("loom", "loom.dlq"), ("", "x"), ("a..b", "x")]
)
def test_bad_prefixes_are_configuration_errors(prefix: str, dead: str) -> None:
    """Illegal or overlapping prefixes are refused at construction."""
    with pytest.raises(ConfigurationError):
        SubjectCodec(prefix, dead)


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.LOOM.c1.3.1042.17.1733580000000000000.5",  # v1: 9 tokens
        "$JS.ACK.hub.ACCHASH.LOOM.c1.2.77.9.1733580000000000000.0",  # v2: 11 tokens
        "$JS.ACK.hub.ACCHASH.LOOM.c1.1.5.4.1733580000000000000.0.rnd",  # v2 with a random token
        "$JS.ACK.LOOM.c1.x.1042.17.1733580000000000000.5",  # not a number
        "$JS.ACK.LOOM.c1.3.1042",  # too short
        "$JS.FC.LOOM.c1.3.1042.17.1733580000000000000.5",  # not an ack subject
        "_INBOX.abc",
        "",
    ],
)
def test_the_delivery_read_from_an_ack_subject_matches_nats_py(reply: str) -> None:
    """The JetStream consumer reads (stream sequence, delivery count) from the ack subject
    itself, skipping nats-py's `Msg.metadata` (~3 µs a message): both must agree, including
    on which subjects are not JetStream deliveries."""
    msg = Msg(_client=None, subject="loom.x", reply=reply, data=b"")  # type: ignore[arg-type]
    try:
        meta = msg.metadata
        expected: tuple[int, int] | None = (meta.sequence.stream, meta.num_delivered)
    except Exception:
        expected = None
    assert _delivery_of(reply) == expected
