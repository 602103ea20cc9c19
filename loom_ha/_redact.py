"""What may be shown of a URL: never its credentials (userinfo, token and password options).

The one place that decides it, for every layer that prints a URL or a text that may echo one
(error messages, endpoints, `loom-ha status`): it imports nothing of loom-ha.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["HIDDEN", "redact", "without_credentials"]

HIDDEN = "***"
"""What stands where a secret was."""

# A URL's userinfo (up to its last "@" before the host) and the value of any option whose
# name holds "token" or "password", wherever a URL stands in a text.
_USERINFO = re.compile(r"(?<=://)[^/?#\s'\"]*@")
_OPTION = re.compile(r"([?&][^=&#\s'\"]*(?:token|password)[^=&#\s'\"]*=)[^&#\s'\"]*", re.I)


def _secret_option(name: str) -> bool:
    return "token" in name.lower() or "password" in name.lower()


def redact(text: str, url: str | None = None) -> str:
    """`text` with every credential shown as ``***``.

    Hidden: the userinfo of any URL in `text` (``consul://***@host``) and the value of each
    URL option whose name holds ``token`` or ``password`` (``?sentinel_password=***``). When
    `text` may echo `url` (a client's error message, the URL itself), `url`'s own userinfo and
    secret option values are hidden too in the forms a URL cannot delimit (spaces, quotes,
    percent-decoded), wherever they stand before ``@`` or after ``=``.
    """
    if url is not None:
        rest = url.partition("://")[2]
        userinfo = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[0]
        hidden = {f"{form}@": f"{HIDDEN}@" for form in (userinfo, unquote(userinfo)) if form}
        for option in rest.partition("?")[2].split("&"):
            name, _, value = option.partition("=")
            if value and _secret_option(name):
                hidden.update({f"={form}": f"={HIDDEN}" for form in (value, unquote(value))})
        for secret in sorted(hidden, key=len, reverse=True):  # a longer form holds a shorter
            text = text.replace(secret, hidden[secret])
    text = _USERINFO.sub(f"{HIDDEN}@", text)
    return _OPTION.sub(rf"\g<1>{HIDDEN}", text)


def without_credentials(url: str) -> str:
    """`url` as an endpoint (statistics, errors): scheme and address only, no userinfo, no
    query (its options may hold secrets)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('?', 1)[0].rpartition('@')[2]}"
