"""map_redis_errors(): the one place where redis-py exceptions become loom-ha errors.

The table maps every redis-py exception class to the most specific loom-ha error
(tests/redis/test_errors.py fails when redis-py grows a class it does not name).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis.exceptions as rex

from loom_ha.errors import (
    ConfigurationError,
    ConnectionLostError,
    LoomHAError,
    TransportError,
)


def _lost(what: str, exc: BaseException) -> LoomHAError:
    return ConnectionLostError(f"{what}: Redis connection lost or server unavailable: {exc}")


def _auth(what: str, exc: BaseException) -> LoomHAError:
    return TransportError(
        f"{what}: Redis refused the credentials or the ACL user lacks a permission "
        f"(check username/password and the user's ACL rules): {exc}"
    )


def _untrusted(what: str, exc: BaseException) -> LoomHAError:
    return TransportError(
        f"{what}: TLS certificate verification failed: the server's certificate is not "
        f"signed by a CA in ssl_ca_certs, or does not name the host (ssl_check_hostname): {exc}"
    )


def _full(what: str, exc: BaseException) -> LoomHAError:
    return ConnectionLostError(
        f"{what}: Redis refused a new connection, its maxclients limit is reached "
        f"(retrying; raise maxclients or close idle clients): {exc}"
    )


def _config(what: str, exc: BaseException) -> LoomHAError:
    return ConfigurationError(f"{what}: value Redis cannot take: {exc}")


def _failed(what: str, exc: BaseException) -> LoomHAError:
    return TransportError(f"{what}: Redis command failed: {exc}")


# Order matters: the first matching row wins, so subclasses come before their bases.
Maker = Callable[[str, BaseException], LoomHAError]
ERROR_TABLE: tuple[tuple[tuple[type[BaseException], ...], Maker], ...] = (
    (
        (
            rex.AuthenticationError,
            rex.AuthenticationWrongNumberOfArgsError,
            rex.AuthorizationError,
            rex.ExternalAuthProviderError,
            rex.NoPermissionError,
        ),
        _auth,
    ),
    # Full pool: a local limit, not a broken server; never invalidates the master.
    ((rex.MaxConnectionsError,), _failed),
    # Server at maxclients (redis-py >= 8.2; a plain ConnectionError before): capacity, not a
    # fault of ours or a config error. Other clients leave, so it is retried, with a message
    # that names the limit. Listed before ConnectionError, its base.
    ((rex.MaxClientsReachedError,), _full),
    # No cluster node answered a topology refresh (redis-py >= 8.2): the deployment is
    # unreachable for now, so retried. Listed before RedisClusterException, its base.
    ((rex.RedisClusterUnreachableError,), _lost),
    (
        (
            rex.BusyLoadingError,  # a restarted server loading its data
            rex.ReadOnlyError,  # a demoted master: find the new one
            rex.MasterDownError,
            rex.TryAgainError,
            rex.ClusterDownError,
            rex.ConnectionError,
            rex.TimeoutError,
            rex.InvalidResponse,  # a torn stream: reconnect
        ),
        _lost,
    ),
    ((rex.DataError,), _config),
    (
        (
            rex.AskError,
            rex.MovedError,
            rex.ClusterCrossSlotError,
            rex.ClusterError,
            rex.ExecAbortError,
            rex.ModuleError,
            rex.NoScriptError,
            rex.NoSuchFieldsetError,
            rex.OutOfMemoryError,
            rex.ResponseError,
            rex.PubSubError,
            rex.WatchError,
            rex.LockNotOwnedError,
            rex.LockError,
            rex.CrossSlotTransactionError,
            rex.InvalidPipelineStack,
            rex.SlotNotCoveredError,
            rex.RedisClusterException,
            rex.ChildDeadlockedError,
            rex.IncorrectPolicyType,
            rex.RedisError,
        ),
        _failed,
    ),
)


# What map_redis_errors() catches.
REDIS_ERRORS = (rex.RedisError, rex.RedisClusterException, ConnectionError, EOFError)


# Replies redis-py has no class for that still mean "the master is changing: retry".
_TRANSIENT_REPLIES = frozenset({"UNBLOCKED", "MASTERDOWN", "NOREPLICAS", "LOADING", "TRYAGAIN"})


# Replies that mean a consumer group is gone: Redis lost it (NOGROUP), or the stream key was
# deleted while an XREADGROUP was blocked on it (Redis 7 unblocks it with this reply).
_GROUP_GONE_REPLIES = ("NOGROUP", "UNBLOCKED the stream key no longer exists")


def group_gone(exc: BaseException) -> bool:
    """Whether `exc` (a redis-py error or its loom-ha translation) says the group is gone."""
    return any(reply in str(exc) for reply in _GROUP_GONE_REPLIES)


def translate(exc: BaseException, what: str = "redis") -> LoomHAError | None:
    """The loom-ha error for a redis-py (or socket) exception, None for anything else."""
    if type(exc) is rex.ResponseError and group_gone(exc):
        # Not a lost master: treating it as one would drop the connections of every
        # command in flight (a publish would be re-sent: a duplicate).
        return _failed(what, exc)
    if isinstance(exc.__cause__, ssl.SSLCertVerificationError) or isinstance(
        exc, ssl.SSLCertVerificationError
    ):
        # redis-py reports it as a ConnectionError (from the ssl error): retrying cannot
        # help, the client trusts another CA than the server's.
        return _untrusted(what, exc)
    if type(exc) is rex.ResponseError and str(exc).split(" ", 1)[0] in _TRANSIENT_REPLIES:
        # e.g. "UNBLOCKED ... instance state changed": a demoted master ended our WAIT.
        return _lost(what, exc)
    for types, make in ERROR_TABLE:
        if isinstance(exc, types):
            return make(what, exc)
    if isinstance(exc, ConnectionError | EOFError):
        return _lost(what, exc)
    return None


@contextmanager
def map_redis_errors(what: str = "redis") -> Iterator[None]:
    """Re-raise redis-py exceptions inside the block as loom-ha errors (``from`` the original).

    Connection-level failures become `ConnectionLostError` (transient: retried),
    refused credentials a non-transient `TransportError`, bad values
    `ConfigurationError`, every other server error a `TransportError`.
    """
    try:
        yield
    except LoomHAError:
        raise
    except REDIS_ERRORS as exc:
        mapped = translate(exc, what)
        if mapped is None:  # pragma: no cover - translate covers every caught type
            raise
        raise mapped from exc
