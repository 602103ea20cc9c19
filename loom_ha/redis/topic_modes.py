"""ModeRouter: which Redis delivery mode carries a topic, from per-pattern overrides.

Publishers and subscribers of one application share the same rules, so a topic
always travels in one mode. For a topic, the most specific matching pattern of
`topic_modes` decides (an exact topic, then the longest fixed part), else the
default mode. A subscription pattern gets every mode that a topic it matches
can be carried in. Patterns use Loom's grammar and the shared matcher
(`loom_ha.topics`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from typing import Literal, TypeAlias

from loom_ha.errors import ConfigurationError
from loom_ha.topics import PatternKind, TopicPattern, parse_pattern
from loom_ha.transport import Capabilities

Mode: TypeAlias = Literal["streams", "pubsub"]
MODES: tuple[Mode, ...] = ("streams", "pubsub")
"""Every mode; streams (durable) first, as in `loom_ha.config.MODES`."""

_CACHE_SIZE = 4096


def check_mode(mode: object, where: str) -> Mode:
    """`mode` if it names a mode; else `ConfigurationError` saying `where` it came from."""
    for known in MODES:
        if mode == known:
            return known
    raise ConfigurationError(f"{where}: mode {mode!r} is not one of {', '.join(MODES)}")


def covers(outer: TopicPattern, inner: TopicPattern) -> bool:
    """True when every topic `inner` matches is also matched by `outer`."""
    if outer.kind is PatternKind.ALL:
        return True
    if inner.kind is PatternKind.EXACT:
        return outer.matches(inner.fixed)
    if outer.kind is PatternKind.PREFIX and inner.kind is PatternKind.PREFIX:
        return inner.fixed.startswith(outer.fixed)
    if outer.kind is PatternKind.SUFFIX and inner.kind is PatternKind.SUFFIX:
        return inner.fixed.endswith(outer.fixed)
    return False


def overlaps(a: TopicPattern, b: TopicPattern) -> bool:
    """True when some topic matches both patterns."""
    if a.kind is PatternKind.ALL or b.kind is PatternKind.ALL:
        return True
    if a.kind is PatternKind.EXACT:
        return b.matches(a.fixed)
    if b.kind is PatternKind.EXACT:
        return a.matches(b.fixed)
    if a.kind is b.kind is PatternKind.PREFIX:
        return a.fixed.startswith(b.fixed) or b.fixed.startswith(a.fixed)
    if a.kind is b.kind is PatternKind.SUFFIX:
        return a.fixed.endswith(b.fixed) or b.fixed.endswith(a.fixed)
    return True  # "p*" and "*s" share the topic p + s


def _rank(pattern: TopicPattern) -> tuple[bool, int]:
    """Specificity: exact topics first, then the longer fixed part."""
    return (not pattern.is_wildcard, len(pattern.fixed))


class ModeRouter:
    """Maps topics and subscription patterns to modes.

    Args:
        default: the mode of topics no override matches.
        topic_modes: ``{pattern: mode}`` overrides.

    Raises:
        ConfigurationError: an unknown mode, an invalid pattern, or two equally
            specific patterns (``a/*`` and ``*/b``) that share topics but name
            different modes; the message names them.
    """

    def __init__(self, default: str, topic_modes: Mapping[str, str] | None = None) -> None:
        self.default: Mode = check_mode(default, "redis")
        rules: list[tuple[TopicPattern, Mode]] = []
        for raw, mode in (topic_modes or {}).items():
            try:
                pattern = parse_pattern(raw)
            except ConfigurationError as exc:
                raise ConfigurationError(f"topic_modes: {exc}") from None
            rules.append((pattern, check_mode(mode, f"topic_modes[{raw!r}]")))
        rules.sort(key=lambda rule: _rank(rule[0]), reverse=True)
        for i, (a, mode_a) in enumerate(rules):
            for b, mode_b in rules[i + 1 :]:
                if _rank(a) == _rank(b) and mode_a != mode_b and overlaps(a, b):
                    # Only "p*" and "*s" of one length can tie (equal exact or prefix
                    # patterns would be the same key); p + s is a topic both match.
                    shared = (
                        a.fixed + b.fixed if a.kind is PatternKind.PREFIX else b.fixed + a.fixed
                    )
                    raise ConfigurationError(
                        f"topic_modes: {a.raw!r} ({mode_a}) and {b.raw!r} ({mode_b}) are equally "
                        f"specific and share topics such as {shared!r}: add a more specific "
                        "pattern for those topics or lengthen one of the two"
                    )
        self.topic_modes: dict[str, Mode] = {p.raw: m for p, m in rules}
        self._rules = rules
        self._exact = {p.fixed: m for p, m in rules if not p.is_wildcard}
        self._wildcards = [(p, m) for p, m in rules if p.is_wildcard]
        self._cache: dict[str, Mode] = {}
        self.modes: tuple[Mode, ...] = self.modes_for("*")
        """Every mode some topic is carried in."""

    def mode_of(self, topic: str) -> Mode:
        """The mode that carries `topic` (cached: this runs on every publish)."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        exact = self._exact.get(topic)
        mode: Mode = (
            exact
            if exact is not None
            else next((m for p, m in self._wildcards if p.matches(topic)), self.default)
        )
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[topic] = mode
        return mode

    def modes_for(self, pattern: str) -> tuple[Mode, ...]:
        """Every mode a topic matched by the subscription `pattern` may be carried in.

        Raises:
            ConfigurationError: `pattern` is not a valid pattern.
        """
        parsed = parse_pattern(pattern)
        if not parsed.is_wildcard:
            return (self.mode_of(parsed.fixed),)
        found: set[Mode] = set()
        for rule, mode in self._rules:  # most specific first
            if covers(rule, parsed):
                found.add(mode)  # every less specific rule (and the default) is shadowed
                break
            if overlaps(rule, parsed):
                found.add(mode)
        else:
            found.add(self.default)
        return tuple(m for m in MODES if m in found)

    def patterns_in(self, mode: Mode, pattern: str) -> list[str]:
        """The overrides naming `mode` that share topics with `pattern` (for error messages)."""
        parsed = parse_pattern(pattern)
        return [p.raw for p, m in self._rules if m == mode and overlaps(p, parsed)]


def weakest(capabilities: Iterable[Capabilities]) -> Capabilities:
    """What holds for every topic when topics travel in different modes.

    Each guarantee holds only if every mode gives it; ``at_least_once``, which also
    says "duplicates possible", is set when any mode redelivers.
    """
    combined: Capabilities | None = None
    for caps in capabilities:
        if combined is None:
            combined = caps
            continue
        flags = {f.name: getattr(combined, f.name) and getattr(caps, f.name) for f in fields(caps)}
        flags["at_least_once"] = combined.at_least_once or caps.at_least_once
        combined = replace(combined, **flags)
    if combined is None:
        raise ValueError("weakest() needs at least one Capabilities")
    return combined
