"""Loom's topic grammar: one wildcard matcher shared by every backend.

Loom builds topics as ``f"{event.type}/{subject_or_source.strip('/')}"``, for example
``node.request/node/agent_1`` or ``node.response/node/echo``. Subscriptions use
Loom 0.3.4's wildcard rules, which treat ``/`` and ``.`` as ordinary characters:

=====================  ===============================================  ==========================
pattern                matches                                          example match
=====================  ===============================================  ==========================
``*``                  every topic                                      ``state.patch/x``
``node.request/*``     every topic starting with ``node.request/``      ``node.request/node/a.b``
``*/node/echo``        every topic ending with ``/node/echo``           ``node.response/node/echo``
``node.response/x``    exactly that topic (no ``*``)                    ``node.response/x``
=====================  ===============================================  ==========================

A ``*`` anywhere else (``a*b``, ``*a*``, ``**``) is rejected with a `ConfigurationError`:
Loom would silently treat it as a literal, which is never what a caller meant.
Published topics must be non-empty and contain no ``*``. Any other character
(spaces, unicode, dots) is fine; each backend maps topics to its own wire names
reversibly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import lru_cache

from loom_ha.errors import ConfigurationError

WILDCARD = "*"


class PatternKind(enum.Enum):
    """How a pattern's fixed part is compared with a topic."""

    EXACT = "exact"  # no wildcard: topic == fixed
    ALL = "all"  # "*": everything
    PREFIX = "prefix"  # "fixed*": topic.startswith(fixed)
    SUFFIX = "suffix"  # "*fixed": topic.endswith(fixed)


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A parsed subscription pattern; `raw` is what the caller passed."""

    raw: str
    kind: PatternKind
    fixed: str

    def matches(self, topic: str) -> bool:
        """True when `topic` is covered by this pattern (Loom's semantics)."""
        kind = self.kind
        if kind is PatternKind.EXACT:
            return topic == self.fixed
        if kind is PatternKind.PREFIX:
            return topic.startswith(self.fixed)
        if kind is PatternKind.SUFFIX:
            return topic.endswith(self.fixed)
        return True

    @property
    def is_wildcard(self) -> bool:
        """True for every pattern that can match more than one topic."""
        return self.kind is not PatternKind.EXACT


@lru_cache(maxsize=4096)
def parse_pattern(pattern: str) -> TopicPattern:
    """Parse and validate a subscription pattern.

    Raises:
        ConfigurationError: empty pattern, or a ``*`` that is not the whole
            pattern, its first or its last character.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ConfigurationError(f"topic pattern must be a non-empty string, got {pattern!r}")
    if pattern == WILDCARD:
        return TopicPattern(pattern, PatternKind.ALL, "")
    stars = pattern.count(WILDCARD)
    if stars == 0:
        return TopicPattern(pattern, PatternKind.EXACT, pattern)
    if stars == 1 and pattern.endswith(WILDCARD):
        return TopicPattern(pattern, PatternKind.PREFIX, pattern[:-1])
    if stars == 1 and pattern.startswith(WILDCARD):
        return TopicPattern(pattern, PatternKind.SUFFIX, pattern[1:])
    raise ConfigurationError(
        f"topic pattern {pattern!r}: '*' may only be the whole pattern, its first or its "
        "last character (Loom's wildcard grammar)"
    )


def matches(pattern: str, topic: str) -> bool:
    """True when `topic` matches `pattern` (see the module docstring for the grammar)."""
    return parse_pattern(pattern).matches(topic)


def validate_topic(topic: str) -> str:
    """Check a topic that is about to be published and return it.

    Raises:
        ConfigurationError: the topic is empty, not a string, or contains ``*``.
    """
    if not isinstance(topic, str) or not topic:
        raise ConfigurationError(f"topic must be a non-empty string, got {topic!r}")
    if WILDCARD in topic:
        raise ConfigurationError(f"topic {topic!r}: '*' is only allowed in subscription patterns")
    return topic
