"""Named checkpoints of the engine's change protocols.

Every ``await step(name)`` is a cancellation point between two steps of a protocol, so a cancel
lands at a boundary the cleanup code knows about. It only yields to the event loop when the task
was cancelled (``checkpoint_if_cancelled``): a full checkpoint per step would cost a loop
iteration each, a measurable share of a small durable write. The same names serve the
tests: an observer can count them and cancel at the N-th, and the environment variable
``ATOMICTOOLS_TEST_CRASH_AT=name[:n]`` (set only by crash tests and the demo) makes the process
``os._exit`` at the n-th time ``name`` is reached, the way SQLite and Mercurial test their crash
points (or kill itself with SIGKILL if ``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import anyio.lowlevel

CRASH_ENV = "ATOMICTOOLS_TEST_CRASH_AT"
CRASH_SIGNAL_ENV = "ATOMICTOOLS_TEST_CRASH_SIGNAL"
CRASH_EXIT_CODE = 137

StepObserver = Callable[[str], None]
_observer: ContextVar[StepObserver | None] = ContextVar("atomictools_step_observer", default=None)


def _parse_crash_spec(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count) if count else 1


_crash_at = _parse_crash_spec(os.environ.get(CRASH_ENV))
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Exit the process at once if the crash tests asked for it here (a no-op otherwise)."""
    if _crash_at is None or _crash_at[0] != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == _crash_at[1]:
        if os.environ.get(CRASH_SIGNAL_ENV) == "KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(CRASH_EXIT_CODE)


async def step(name: str) -> None:
    """Mark a protocol boundary: crash point, test observer, then raise if cancelled."""
    crash_point(name)
    observer = _observer.get()
    if observer is not None:
        observer(name)
    await anyio.lowlevel.checkpoint_if_cancelled()


@contextmanager
def observe_steps(observer: StepObserver) -> Iterator[None]:
    """Call ``observer(name)`` at every step reached in this context (used by the tests)."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)
