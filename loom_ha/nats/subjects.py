"""Loom topics <-> NATS subjects: a reversible encoding and the narrowest native wildcard.

A topic is split on ``/`` into tokens; each token becomes one subject token. Characters
outside ``[A-Za-z0-9_-]`` (space, ``.``, ``*``, ``>``, ``~``, control characters, any
non-ASCII) are written as ``~XX`` per UTF-8 byte (upper-case hex), and the empty token is
written as a lone ``~``. The subject is ``<prefix>.<token>.<token>...``::

    node.request/node/agent_1  ->  loom.node~2Erequest.node.agent_1
    a//b                       ->  loom.a.~.b
    with space/ü               ->  loom.with~20space.~C3~BC

Every subject produced this way decodes back to the exact topic.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

from loom_ha.errors import ConfigurationError
from loom_ha.topics import PatternKind, TopicPattern, validate_topic

__all__ = [
    "DEFAULT_DEAD_LETTER_PREFIX",
    "DEFAULT_PREFIX",
    "SubjectCodec",
    "decode_token",
    "encode_token",
    "safe_name",
]

DEFAULT_PREFIX = "loom"
DEFAULT_DEAD_LETTER_PREFIX = "loomdlq"
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_EMPTY = "~"
_ESCAPE = re.compile(r"~([0-9A-F]{2})")
_PREFIX_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


@lru_cache(maxsize=8192)
def encode_token(token: str) -> str:
    """One topic token (no ``/``) as a NATS-legal subject token."""
    if not token:
        return _EMPTY
    if all(c in _SAFE for c in token):
        return token
    out = []
    for char in token:
        if char in _SAFE:
            out.append(char)
        else:
            out.extend(f"~{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


@lru_cache(maxsize=8192)
def decode_token(token: str) -> str:
    """Inverse of `encode_token`.

    Raises:
        ValueError: `token` is not something `encode_token` produces.
    """
    if token == _EMPTY:
        return ""
    if "~" not in token:
        if not token or not all(c in _SAFE for c in token):
            raise ValueError(f"subject token {token!r} is not a loom-ha encoded token")
        return token
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(token):
        raw += _plain(token[pos : match.start()])
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += _plain(token[pos:])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"subject token {token!r} does not decode to UTF-8") from exc


def _plain(part: str) -> bytes:
    if not all(c in _SAFE for c in part):
        raise ValueError(f"subject token part {part!r} has unescaped characters")
    return part.encode("ascii")


def safe_name(text: str, limit: int = 24) -> str:
    """A readable, NATS-name-safe rendering of `text` (for consumer and queue names)."""
    return "".join(c if c in _SAFE else "_" for c in text)[:limit] or "_"


def digest(*parts: str) -> str:
    """A short stable hash of `parts`, so names are unique yet bounded in length."""
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()


class SubjectCodec:
    """Topic/subject mapping under one subject prefix (``loom`` by default).

    Args:
        prefix: first subject token(s), e.g. ``loom`` or ``acme.loom``.
        dead_letter_prefix: prefix of dead-letter subjects (``loomdlq``).

    Raises:
        ConfigurationError: a prefix is not dot-separated ``[A-Za-z0-9_-]`` tokens, or both
            prefixes overlap (dead letters would reach subscribers).
    """

    def __init__(
        self, prefix: str = DEFAULT_PREFIX, dead_letter_prefix: str = DEFAULT_DEAD_LETTER_PREFIX
    ) -> None:
        for name, value in (("subject_prefix", prefix), ("dead_letter_prefix", dead_letter_prefix)):
            if not all(_PREFIX_TOKEN.fullmatch(t) for t in value.split(".")):
                raise ConfigurationError(
                    f"{name} {value!r}: use dot-separated tokens of letters, digits, '_' and '-'"
                )
        if (dead_letter_prefix + ".").startswith(prefix + ".") or (prefix + ".").startswith(
            dead_letter_prefix + "."
        ):
            raise ConfigurationError(
                f"dead_letter_prefix {dead_letter_prefix!r} must not overlap subject_prefix "
                f"{prefix!r}"
            )
        self.prefix = prefix
        self.dead_letter_prefix = dead_letter_prefix
        self._head = prefix + "."
        self.all_subjects = prefix + ".>"
        self.all_dead_letters = dead_letter_prefix + ".>"
        self.subject = lru_cache(maxsize=16384)(self._subject)
        self.topic = lru_cache(maxsize=16384)(self._topic)
        self._checked = lru_cache(maxsize=16384)(self._checked_subject)

    def publish_subject(self, topic: str) -> str:
        """The subject to publish `topic` on, after checking it is a publishable topic.

        Cached: a topic seen before costs one dictionary lookup.

        Raises:
            ConfigurationError: the topic is empty, not a string, or contains ``*``.
        """
        try:
            return self._checked(topic)
        except TypeError:  # unhashable: certainly not a topic string
            validate_topic(topic)
            raise

    def _checked_subject(self, topic: str) -> str:
        validate_topic(topic)
        return self._subject(topic)

    def _subject(self, topic: str) -> str:
        return self._head + ".".join(encode_token(t) for t in topic.split("/"))

    def _topic(self, subject: str) -> str:
        if not subject.startswith(self._head):
            raise ValueError(f"subject {subject!r} is outside prefix {self.prefix!r}")
        return "/".join(decode_token(t) for t in subject[len(self._head) :].split("."))

    def dead_letter_subject(self, topic: str) -> str:
        """Where dead letters of `topic` go: the topic's tokens under the dead-letter prefix."""
        return self.dead_letter_prefix + self._subject(topic)[len(self.prefix) :]

    def native(self, pattern: TopicPattern) -> str:
        """The narrowest native subject that covers every topic `pattern` matches.

        Exact topics map to their subject. A prefix pattern maps to ``<complete
        tokens>.>`` (the last, partial token is left to the exact matcher); ``*`` and
        suffix patterns need the whole ``<prefix>.>``.
        """
        if pattern.kind is PatternKind.EXACT:
            return self.subject(pattern.fixed)
        if pattern.kind is PatternKind.PREFIX:
            complete = pattern.fixed.split("/")[:-1]
            if complete:
                return self._head + ".".join(encode_token(t) for t in complete) + ".>"
        return self.all_subjects
