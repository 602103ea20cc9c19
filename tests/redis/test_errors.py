"""map_redis_errors(): every redis-py exception has an explicit loom-ha counterpart."""

from __future__ import annotations

import inspect

import pytest
import redis.exceptions as rex

from loom_ha.errors import ConfigurationError, ConnectionLostError, TransientError, TransportError
from loom_ha.redis import map_redis_errors
from loom_ha.redis._errors import ERROR_TABLE


def _client_exceptions() -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(rex, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == rex.__name__
    ]


@pytest.mark.parametrize("cls", _client_exceptions(), ids=lambda c: c.__name__)
def test_every_client_exception_is_named_in_the_table(cls: type[BaseException]) -> None:
    """A redis-py exception class missing from the table fails here (httpx's exhaustive test)."""
    named = {t for types, _ in ERROR_TABLE for t in types}
    assert cls in named, f"map {cls.__name__} explicitly in loom_ha/redis/_errors.py"


@pytest.mark.parametrize(
    ("raised", "expected", "transient"),
    [
        (rex.ConnectionError("reset"), ConnectionLostError, True),
        (rex.TimeoutError("slow"), ConnectionLostError, True),
        (rex.ReadOnlyError("READONLY"), ConnectionLostError, True),
        (rex.BusyLoadingError("LOADING"), ConnectionLostError, True),
        (rex.AuthenticationError("WRONGPASS"), TransportError, False),
        (rex.NoPermissionError("NOPERM"), TransportError, False),
        (rex.DataError("bad"), ConfigurationError, False),
        (rex.ResponseError("NOGROUP"), TransportError, False),
        (rex.ResponseError("UNBLOCKED force unblock"), ConnectionLostError, True),
        # A stream key deleted under a blocked XREADGROUP: the group is gone, not the master.
        (rex.ResponseError("UNBLOCKED the stream key no longer exists"), TransportError, False),
        (rex.MaxClientsReachedError("max number of clients reached"), ConnectionLostError, True),
        (rex.RedisClusterUnreachableError("no node answered"), ConnectionLostError, True),
        (ConnectionResetError("peer"), ConnectionLostError, True),
    ],
)
def test_errors_map_to_the_most_specific_loom_error(
    raised: BaseException, expected: type[Exception], transient: bool
) -> None:
    """Connection trouble is transient; credentials and bad values are not; the cause is kept."""
    with pytest.raises(expected) as info, map_redis_errors("op"):
        raise raised
    assert isinstance(info.value, TransientError) is transient
    assert info.value.__cause__ is raised
