"""atomictools: atomic, cancellation-safe and crash-safe file changes for AI agents.

The embedding API in one import::

    from atomictools import Workspace

    ws = Workspace(["/srv/project"])
    result = await ws.write("notes.txt", "hello\\n")
    await ws.edit("notes.txt", [("hello", "hello, world")], expected_sha256=result.sha256)
"""

import atomictools.engine as _engine
from atomictools.engine import *  # noqa: F403  (the public API is the engine's)
from atomictools.engine import __all__ as _engine_api

__version__ = "0.1.0"

__all__ = [*_engine_api, "__version__"]  # noqa: PLE0604


def __getattr__(name: str) -> object:
    """Names the engine gives on first use (``PgDatabase``: an optional extra's driver)."""
    return getattr(_engine, name)
