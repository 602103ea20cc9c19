"""The nkey seed and ``.creds`` files of NATS auth, checked before nats-py reads them.

nats-py reads them itself on every connect, and a file it cannot parse makes it fail
obscurely or, for a ``.creds`` file without a JWT, loop forever reading it. Checked here
first, a bad file is one `ConfigurationError` naming its path; no message ever quotes a
file's content, nor a value that looks like a seed or a JWT given where a path belongs.
"""

from __future__ import annotations

import re
from pathlib import Path

from loom_ha.errors import ConfigurationError

__all__ = ["check_creds_file", "check_seed_file", "looks_secret"]

_SECRET = re.compile(r"S[A-Z][A-Z2-7]{50,}|eyJ[\w-]+\.[\w-]+|.*-----BEGIN", re.DOTALL)


def looks_secret(value: str) -> bool:
    """Whether `value` looks like an nkey seed, a JWT or a PEM-style block (not a path)."""
    return _SECRET.match(value) is not None


def _read(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"{option}={path!r}: cannot read it ({reason})") from None


def _check_seed(option: str, path: str, text: bytes) -> None:
    """`text` must be a user's nkey seed (``SU...``); errors hold no byte of it."""
    try:
        import nkeys  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigurationError(
            f"{option}: nkey auth needs the nkeys package: pip install 'loom-ha[nats]'"
        ) from None
    try:
        public = bytes(nkeys.from_seed(bytearray(text.strip())).public_key)
    except Exception:  # nkeys' own errors, or nacl's on a seed of the wrong length
        public = b""
    if not public.startswith(b"U"):
        raise ConfigurationError(
            f"{option}={path!r}: does not hold a user's nkey seed (one line starting 'SU')"
        )


def check_seed_file(path: str) -> None:
    """`path` must hold a user's nkey seed, alone (as nats-py's ``nkeys_seed`` reads it).

    Raises:
        ConfigurationError: missing, unreadable, or not a user seed (the file named).
    """
    _check_seed("nkeys_seed", path, _read(path, "nkeys_seed"))


def check_creds_file(path: str) -> None:
    """`path` must be a ``.creds`` file: a user JWT block, then a user seed block.

    Raises:
        ConfigurationError: missing, unreadable, or malformed (the file named).
    """
    lines = _read(path, "user_credentials").splitlines()

    def after(marker: bytes) -> bytes:
        for n, line in enumerate(lines[:-1]):
            if marker in line:
                return lines[n + 1].strip()
        raise ConfigurationError(
            f"user_credentials={path!r}: not a .creds file (no {marker.decode()!r} block)"
        )

    if after(b"BEGIN NATS USER JWT").count(b".") != 2:
        raise ConfigurationError(f"user_credentials={path!r}: the user JWT block holds no JWT")
    _check_seed("user_credentials", path, after(b"BEGIN USER NKEY SEED"))
