"""The loop async tests run on: asyncio's, or uvloop's made to let a timeout stop the test.

pytest-timeout stops a test by raising from a SIGALRM handler. asyncio's loop lets that
exception out of `run_until_complete` (the handler runs while it waits in `select`), so the
test fails as timed out. uvloop runs every Python signal handler inside its own callback
`Loop._read_from_self` and logs what the handler raised as "Exception in callback": the
timeout is lost and a hung test hangs the session (seen on a stuck chaos test). The loop
below hands such an exception (a BaseException that is no Exception, e.g. pytest's
`Failed`) back to uvloop, which then stops and raises it from `run_until_complete`, like
asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from loom_ha._loop import EventLoopChoice

__all__ = ["loop_factory_for_tests"]

# uvloop's message for an error in the callback that runs Python signal handlers.
_SIGNAL_CALLBACK = "Exception in callback Loop._read_from_self"


def loop_factory_for_tests(chosen: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of `chosen`'s loops, for tests (see the module docstring for uvloop)."""
    if chosen.name != "uvloop":
        return chosen.factory
    import uvloop

    class _TestLoop(uvloop.Loop):
        # Overridden although asyncio's docstring advises against it: uvloop offers no other
        # way to get the exception out of its callback (a custom exception handler's own
        # errors are logged too). Raising here reaches uvloop's "stop with this error" path.
        def call_exception_handler(self, context: dict[str, Any]) -> None:
            error = context.get("exception")
            # Only what stops a test (pytest's outcomes): a handler's Exception stays logged.
            if (
                isinstance(error, BaseException)
                and not isinstance(error, Exception)
                and context.get("message") == _SIGNAL_CALLBACK
            ):
                raise error
            super().call_exception_handler(context)

    return _TestLoop
