"""Throw-away NATS identities for test servers: nkey users, and operator/account/user JWTs.

Made in Python with the `nkeys` package (nats-py's ``nkeys`` extra), so no ``nsc`` is
needed. A JWT here is NATS' ed25519-nkey profile: ``base64url(header).base64url(claims)``
signed with the issuer's seed, the signature base64url-encoded as the third part.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AUTH_CONFIG",
    "CREDS_FILE",
    "SEED_FILE",
    "NkeyUser",
    "OperatorAuth",
    "make_nkey_user",
    "make_operator_auth",
    "write_auth_config",
]

_UNLIMITED = -1
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
AUTH_CONFIG = "auth.conf"
"""Name of the server's auth config file in its working dir."""
SEED_FILE = "user.nk"
"""Name of an nkey user's seed file."""
CREDS_FILE = "user.creds"
"""Name of an operator-mode user's credentials file (its JWT and seed)."""


def _nkeys() -> Any:
    try:
        import nkeys  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - only without the nats extra
        raise ImportError(
            "nkey and JWT test identities need nkeys: pip install 'loom-ha[nats]'"
        ) from exc
    return nkeys


class _Key:
    """One nkey pair: the seed (secret) and its public key (``U...``, ``A...``, ``O...``)."""

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self._pair = _nkeys().from_seed(bytearray(seed.encode()))
        self.public = bytes(self._pair.public_key).decode()

    @classmethod
    def new(cls, role: str) -> _Key:
        nkeys = _nkeys()
        prefix = {
            "user": nkeys.PREFIX_BYTE_USER,
            "account": nkeys.PREFIX_BYTE_ACCOUNT,
            "operator": nkeys.PREFIX_BYTE_OPERATOR,
        }[role]
        return cls(bytes(nkeys.encode_seed(os.urandom(32), prefix)).decode())

    def sign(self, data: bytes) -> bytes:
        return bytes(self._pair.sign(data))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: _Key, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT about `subject`, signed by `issuer`."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    # jti: a unique id derived from the claims (servers do not check how it was made).
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (_HEADER, claims)
    )
    return f"{signing_input}.{_b64url(issuer.sign(signing_input.encode()))}"


def _write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read, from the start."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(text)


@dataclass(frozen=True)
class NkeyUser:
    """A user identified by an nkey: the server lists `public_key`, the client reads `seed_file`."""

    public_key: str
    seed_file: Path

    def server_config(self) -> str:
        """nats-server config admitting this user (and nobody else)."""
        return f'authorization {{\n  users = [ {{ nkey: "{self.public_key}" }} ]\n}}\n'


def make_nkey_user(directory: Path) -> NkeyUser:
    """Create (or reuse) `SEED_FILE`, a user seed file, in `directory`."""
    seed_file = directory / SEED_FILE
    if seed_file.exists():
        key = _Key(seed_file.read_text().strip())
    else:
        key = _Key.new("user")
        _write_secret(seed_file, key.seed + "\n")
    return NkeyUser(key.public, seed_file)


@dataclass(frozen=True)
class OperatorAuth:
    """Operator-mode (decentralized JWT) identities: an operator, its system account, one
    account with JetStream enabled, and one user of it, whose JWT and seed are in `creds_file`."""

    operator_jwt: str
    system_account: str
    account_jwts: dict[str, str]
    creds_file: Path

    def server_config(self) -> str:
        """nats-server config trusting the operator, with the accounts preloaded in memory."""
        preload = "".join(f'  {key}: "{jwt}"\n' for key, jwt in self.account_jwts.items())
        return (
            f'operator: "{self.operator_jwt}"\n'
            f"system_account: {self.system_account}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n{preload}}}\n"
        )


def _creds(user_jwt: str, user_seed: str) -> str:
    """The ``.creds`` file format clients read (the JWT block, then the seed block)."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def make_operator_auth(directory: Path) -> OperatorAuth:
    """Create (or reuse) the identities in `directory`: ``operator.jwt``, ``accounts.json``
    (the account JWTs the server preloads) and `CREDS_FILE` (the user's JWT and seed)."""
    files = [directory / n for n in ("operator.jwt", "accounts.json", CREDS_FILE)]
    if all(path.exists() for path in files):
        saved = json.loads(files[1].read_text())
        return OperatorAuth(
            files[0].read_text().strip(), saved["system"], saved["accounts"], files[2]
        )
    operator, system, account, user = (
        _Key.new(role) for role in ("operator", "account", "account", "user")
    )
    # JetStream needs a system account (for its internal subscriptions).
    operator_jwt = _jwt(
        operator,
        operator.public,
        "loom-ha-test",
        {"type": "operator", "system_account": system.public},
    )
    limits: dict[str, Any] = dict.fromkeys(
        ("subs", "data", "payload", "imports", "exports", "conn", "leaf"), _UNLIMITED
    )
    limits["wildcards"] = True
    # JetStream is enabled for an account whose JWT grants it storage.
    storage = dict.fromkeys(("mem_storage", "disk_storage", "streams", "consumer"), _UNLIMITED)
    accounts = {
        system.public: _jwt(operator, system.public, "SYS", {"type": "account", "limits": limits}),
        account.public: _jwt(
            operator, account.public, "loom", {"type": "account", "limits": limits | storage}
        ),
    }
    user_claims = {"type": "user", "pub": {}, "sub": {}} | dict.fromkeys(
        ("subs", "data", "payload"), _UNLIMITED
    )
    user_jwt = _jwt(account, user.public, "loom", user_claims)
    files[0].write_text(operator_jwt + "\n")
    files[1].write_text(json.dumps({"system": system.public, "accounts": accounts}))
    _write_secret(files[2], _creds(user_jwt, user.seed))
    return OperatorAuth(operator_jwt, system.public, accounts, files[2])


def write_auth_config(directory: Path, config: str) -> None:
    """Write `config` as the server's auth config file (`AUTH_CONFIG`) in `directory`."""
    (directory / AUTH_CONFIG).write_text(config)
