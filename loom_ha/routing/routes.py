"""`RequestRoutes`: which topics carry requests, where their replies come back, how they pair.

Loom's convention is the default: a request for node ``X`` is published on
``node.request/X``, the node answers on ``node.response/X`` (or ``node.error/X``) with
``data["request_id"]`` = the request's id. Any app with another convention passes its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LOOM_ROUTES", "RequestRoutes", "loom_request_id", "service_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")

INBOX_MARK = "@"
"""Separates a request topic from the instance id in an instance's inbox topic."""


def loom_request_id(reply: Any) -> str | None:
    """The id of the request a Loom reply answers (``data["request_id"]``)."""
    data = getattr(reply, "data", None)
    if isinstance(data, Mapping):
        value = data.get("request_id")
        return value if isinstance(value, str) else None
    return None


def service_name(text: str) -> str:
    """A registry-safe service name for a node path (``node/echo`` -> ``node-echo``).

    Registries allow letters, digits, ``_``, ``.``, ``-``; every other run of characters
    becomes ``-``. Distinct paths may share a name, so instances also record their exact
    topic and lookups filter on it.
    """
    name = _UNSAFE.sub("-", text).strip("-._")[:128]
    return name or "loom"


@dataclass(frozen=True, kw_only=True)
class RequestRoutes:
    """The request/reply convention a `BalancedTransport` routes.

    Attributes:
        request_prefix: exact topics under it are requests to the service named by
            the rest of the topic.
        reply_prefixes: replies to a request on ``request_prefix + X`` arrive on
            ``p + X`` for each of these.
        error_prefix: replies under this prefix are failures (for the balancer).
        request_id: extracts from a reply the id of the request it answers.
        node_prefix: dropped from a request path to name its service (Loom addresses
            node ``echo`` as ``node/echo``; the registry lists it as ``echo``).
    """

    request_prefix: str = "node.request/"
    reply_prefixes: tuple[str, ...] = ("node.response/", "node.error/")
    error_prefix: str = "node.error/"
    request_id: Callable[[Any], str | None] = loom_request_id
    node_prefix: str = "node/"

    def service(self, path: str) -> str:
        """The registry service of a request path: Loom's ``node/echo`` is service ``echo``."""
        return service_name(path.removeprefix(self.node_prefix))

    def target(self, topic: str) -> str | None:
        """The service path a request topic addresses, or None if `topic` is no request.

        Wildcards and instance inboxes (``...@instance``) are not requests to route.
        """
        if not topic.startswith(self.request_prefix):
            return None
        path = topic[len(self.request_prefix) :]
        if not path or "*" in path or INBOX_MARK in path:
            return None
        return path

    def inbox(self, topic: str, instance_id: str) -> str:
        """The topic only `instance_id` consumes for requests on `topic`."""
        return f"{topic}{INBOX_MARK}{instance_id}"

    def replies(self, topic: str) -> tuple[str, ...]:
        """The reply topics of the request topic `topic`."""
        path = topic[len(self.request_prefix) :]
        return tuple(prefix + path for prefix in self.reply_prefixes)

    def is_error(self, topic_or_type: str) -> bool:
        """True for an error reply (by its topic, or by its CloudEvent type)."""
        return topic_or_type.startswith(self.error_prefix) or (
            topic_or_type == self.error_prefix.rstrip("/")
        )


LOOM_ROUTES = RequestRoutes()
"""Loom 0.3.4's convention (``node.request/X`` -> ``node.response/X`` / ``node.error/X``)."""
