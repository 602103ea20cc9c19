"""The shared topic grammar: Loom's wildcard semantics, nothing more."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom_ha.errors import ConfigurationError
from loom_ha.topics import PatternKind, matches, parse_pattern, validate_topic

TOPICS = st.text(min_size=1).filter(lambda t: "*" not in t)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("*", "anything/at all", True),
        ("node.request/*", "node.request/node/a", True),
        ("node.request/*", "node.request/", True),
        ("node.request/*", "node.response/node/a", False),
        ("node*", "node.request/x", True),  # a prefix crosses '.' and '/'
        ("*/node/echo", "node.response/node/echo", True),
        ("*/node/echo", "node.response/node/echo2", False),
        ("*echo", "echo", True),
        ("node.response/node/a", "node.response/node/a", True),
        ("node.response/node/a", "node.response/node/ab", False),
        ("ünï/*", "ünï/日本", True),
    ],
)
def test_loom_examples(pattern: str, topic: str, expected: bool) -> None:
    """Each documented example matches exactly as Loom 0.3.4's memory transport would."""
    assert matches(pattern, topic) is expected


@given(TOPICS, TOPICS)
def test_agrees_with_loom_reference_matcher(fixed: str, topic: str) -> None:
    """For every legal pattern shape, the matcher agrees with Loom's own `_match`."""

    def loom_match(topic: str, pattern: str) -> bool:  # loom/infra/transport/memory.py
        if pattern == "*":
            return True
        if pattern.endswith("*"):
            return topic.startswith(pattern[:-1])
        if pattern.startswith("*"):
            return topic.endswith(pattern[1:])
        return topic == pattern

    for pattern in ("*", fixed + "*", "*" + fixed, fixed):
        assert matches(pattern, topic) == loom_match(topic, pattern)


@pytest.mark.parametrize("bad", ["", "a*b", "*a*", "**", "a**"])
def test_ambiguous_patterns_are_rejected(bad: str) -> None:
    """A '*' in the middle or twice fails loudly instead of matching nothing."""
    with pytest.raises(ConfigurationError):
        parse_pattern(bad)


def test_pattern_kinds() -> None:
    """Parsing yields the kind and the fixed part backends map to native subscriptions."""
    assert parse_pattern("*").kind is PatternKind.ALL
    assert parse_pattern("a/*").fixed == "a/"
    assert parse_pattern("*/a").kind is PatternKind.SUFFIX
    assert not parse_pattern("a").is_wildcard


@pytest.mark.parametrize("bad", ["", "a*", "*"])
def test_published_topics_must_be_concrete(bad: str) -> None:
    """Publishing to an empty topic or one with '*' is a configuration error."""
    with pytest.raises(ConfigurationError):
        validate_topic(bad)
