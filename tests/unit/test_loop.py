"""The event loop of the CLI, the demo and the pytest plugin: flag, $LOOM_HA_LOOP, then auto."""

from __future__ import annotations

import asyncio
import inspect
import sys

import pytest
import uvloop

from loom_ha._loop import choose_loop, run
from loom_ha.cli import main
from loom_ha.errors import ConfigurationError

pytest_plugins = ["pytester"]


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop as if not installed: `import uvloop` raises ImportError."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        (None, None, "uvloop"),  # auto: installed here
        (None, "", "uvloop"),
        (None, "asyncio", "asyncio"),
        (None, " uvloop ", "uvloop"),
        ("asyncio", None, "asyncio"),
        ("asyncio", "uvloop", "asyncio"),  # the flag wins
        ("uvloop", "asyncio", "uvloop"),
        ("auto", "asyncio", "uvloop"),
    ],
)
def test_the_flag_wins_over_the_variable_and_auto_takes_uvloop(
    flag: str | None, env: str | None, expected: str
) -> None:
    """The flag decides, else LOOM_HA_LOOP, else auto, which takes uvloop when it is installed."""
    environ = {} if env is None else {"LOOM_HA_LOOP": env}
    chosen = choose_loop(flag, env=environ)
    assert chosen.name == expected
    made = chosen.factory()
    try:
        assert isinstance(made, uvloop.Loop) is (expected == "uvloop")
    finally:
        made.close()


def test_a_bad_value_is_named_with_where_it_came_from() -> None:
    """A value that is no loop fails naming the variable or flag and the choices."""
    with pytest.raises(ConfigurationError, match=r"LOOM_HA_LOOP='trio'.*auto, asyncio, uvloop"):
        choose_loop(env={"LOOM_HA_LOOP": "trio"})
    with pytest.raises(ConfigurationError, match=r"--loom-ha-loop='uv'"):
        choose_loop("uv", flag_name="--loom-ha-loop", env={})


@pytest.mark.usefixtures("no_uvloop")
def test_without_uvloop_auto_falls_back_and_insisting_fails_naming_the_extra() -> None:
    """Not installed: auto runs asyncio with the hint; asking for uvloop fails, naming who asked."""
    fallback = choose_loop(env={})
    assert fallback.name == "asyncio"
    assert "pip install 'loom-ha[fast]'" in fallback.description
    with pytest.raises(ConfigurationError, match=r"--loop=uvloop.*pip install 'loom-ha\[fast\]'"):
        choose_loop("uvloop", env={})
    with pytest.raises(ConfigurationError, match=r"LOOM_HA_LOOP=uvloop.*not installed"):
        choose_loop(env={"LOOM_HA_LOOP": "uvloop"})


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_run_runs_on_the_chosen_loop(loop: str) -> None:
    """`run(main, loop=...)` runs the coroutine to its result on that kind of loop."""
    assert run(_loop_module(), loop=loop).startswith(loop)


@pytest.mark.usefixtures("no_uvloop")
def test_run_closes_the_coroutine_it_cannot_run() -> None:
    """A loop that cannot be had closes `main` (no 'never awaited' warning) and raises."""
    coro = _loop_module()
    with pytest.raises(ConfigurationError):
        run(coro, loop="uvloop")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


@pytest.mark.parametrize(("loop", "shown"), [("asyncio", "asyncio"), ("uvloop", "uvloop 0.")])
def test_the_demo_runs_on_either_loop_and_says_which(
    loop: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loom-ha demo --loop X` answers every request and its first line names the loop."""
    assert main(["demo", "--requests", "30", "--concurrency", "4", "--loop", loop]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"event loop: {shown}")


@pytest.mark.usefixtures("no_uvloop")
def test_the_cli_asked_for_a_missing_uvloop_fails_once_naming_the_extra(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--loop uvloop` without uvloop exits 2 with one line that says what to install."""
    assert main(["demo", "--loop", "uvloop"]) == 2
    out = capsys.readouterr().out
    assert out.count("uvloop is not installed") == 1
    assert "pip install 'loom-ha[fast]'" in out


def test_version_names_the_event_loop(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loom-ha --version` shows the loop the subcommands would run on."""
    monkeypatch.setenv("LOOM_HA_LOOP", "asyncio")
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert "event loop: asyncio" in capsys.readouterr().out


_INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
_PROBE = """
import asyncio

import uvloop

async def test_probe():
    uv = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    print("LOOP=" + ("uvloop" if uv else "asyncio"))
"""


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), None, "asyncio"),
        (("--loom-ha-loop=uvloop",), None, "uvloop"),
        (("--loom-ha-loop=auto",), None, "uvloop"),
        ((), "uvloop", "uvloop"),
        (("--loom-ha-loop=asyncio",), "uvloop", "asyncio"),
    ],
)
def test_the_plugin_runs_async_tests_on_the_chosen_loop(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    env: str | None,
    expected: str,
) -> None:
    """Async tests of a project using the plugin stay on asyncio unless the option or the
    variable asks for uvloop (the option wins); the report header names the loop."""
    if env is None:
        monkeypatch.delenv("LOOM_HA_LOOP", raising=False)
    else:
        monkeypatch.setenv("LOOM_HA_LOOP", env)
    pytester.makeini(_INI)
    pytester.makepyfile(_PROBE)
    result = pytester.runpytest_inprocess("-s", *args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"loom-ha: event loop {expected}*", f"*LOOP={expected}*"])


@pytest.mark.usefixtures("no_uvloop")
def test_the_plugin_asked_for_a_missing_uvloop_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """`--loom-ha-loop=uvloop` without uvloop stops the session with the extra to install."""
    pytester.makeini(_INI)
    pytester.makepyfile(_PROBE)
    result = pytester.runpytest_inprocess("--loom-ha-loop=uvloop")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--loom-ha-loop=uvloop*pip install 'loom-ha[[]fast[]]'*"])


_HUNG = """
import asyncio

import pytest

@pytest.mark.timeout(0.5)
async def test_hung():
    await asyncio.sleep(30)
"""


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_timeout_stops_a_hung_async_test_on_either_loop(
    pytester: pytest.Pytester, loop: str
) -> None:
    """pytest-timeout's SIGALRM fails a hung async test; on uvloop, which swallowed what a
    signal handler raised, the test slept its 30 s out and passed."""
    pytester.makeini(_INI)
    pytester.makepyfile(_HUNG)
    # A subprocess: pytest-timeout in an in-process run would take over this test's SIGALRM.
    result = pytester.runpytest_subprocess(f"--loom-ha-loop={loop}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout (>0.5s) from pytest-timeout*"])
