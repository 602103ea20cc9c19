"""`loom-ha bench --redis-parser`: the job runs on the parser asked for (structure only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loom_ha.bench.redis_parser import parsers_used, use_redis_parser
from loom_ha.cli import main
from loom_ha.errors import ConfigurationError
from loom_ha.testing.servers import RedisServer

JOB_TIMEOUT = 100.0  # s: a guard against a hung job (a few s when idle), not a measurement
CLI = "import sys; from loom_ha.cli import main; sys.exit(main(sys.argv[1:]))"


def _bench_job(url: str, *options: str) -> str:
    """Run `loom-ha bench --transport redis` as a fresh process with tiny rows; its output."""
    args = ["bench", "--transport", "redis", "--url", url, "--loop", "asyncio"]
    args += ["--events", "100", "--pings", "10", "--rounds", "1", *options]
    done = subprocess.run(
        [sys.executable, "-c", CLI, *args],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _parsers(out: str) -> set[str]:
    line = next(line for line in out.splitlines() if line.startswith("redis-py parsers used"))
    return set(line.partition(": ")[2].split(", "))


@pytest.mark.redis
@pytest.mark.parametrize(
    ("option", "title", "used"),
    [
        # loom-ha and the raw clients speak RESP2; FastStream's connections RESP3.
        ("python", "redis parser: pure Python", {"_AsyncRESP2Parser", "_AsyncRESP3Parser"}),
        ("hiredis", "redis parser: hiredis", {"_AsyncHiredisParser"}),
    ],
)
def test_job_uses_the_parser_asked_for(
    redis_server: RedisServer, option: str, title: str, used: set[str]
) -> None:
    """Every redis-py connection of the job (loom-ha's, raw and FastStream's) got that
    parser, and the table's title names it with the event loop."""
    out = _bench_job(redis_server.url, "--redis-parser", option)
    assert f"(event loop: asyncio, {title}" in " ".join(out.split()), out
    assert _parsers(out) == used, out


def test_python_after_redis_was_imported_with_hiredis_is_refused() -> None:
    """In a process that imported redis-py with hiredis the pure-Python parser cannot be
    chosen any more: said at once, never silently measured on hiredis."""
    import redis.utils

    assert redis.utils.HIREDIS_AVAILABLE  # the dev environment installs the fast extra
    with pytest.raises(ConfigurationError, match="already imported with hiredis"):
        use_redis_parser("python")
    assert use_redis_parser(None).startswith("hiredis ")


def test_unknown_parser_is_named() -> None:
    """A parser name that is not hiredis or python is refused, naming it."""
    with pytest.raises(ConfigurationError, match="'fast'"):
        use_redis_parser("fast")


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        (["--transport", "nats"], "not to --transport nats"),
        (["--transport", "redis", "--processes", "2"], "--processes"),
        (["--transport", "redis", "--soak"], "not to --soak"),
    ],
)
def test_flag_where_it_does_nothing_is_refused(
    options: list[str], culprit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--redis-parser on a run without in-process Redis rows fails at once, naming why."""
    assert main(["bench", "--loop", "asyncio", "--redis-parser", "python", *options]) == 2
    assert culprit in " ".join(capsys.readouterr().out.split())


def test_parsers_used_records_only_inside() -> None:
    """Connections built inside the block are recorded; after it redis-py is as before."""
    from redis.asyncio.connection import AbstractConnection, Connection

    before = AbstractConnection.set_parser
    with parsers_used() as seen:
        Connection(protocol=2)
    Connection(protocol=3)
    assert seen == {"_AsyncHiredisParser"}
    assert AbstractConnection.set_parser is before
