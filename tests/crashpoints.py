"""What the crash tests' child processes share: the list of crash points a run passes."""

from __future__ import annotations

import sys


def list_crash_points() -> list[str]:
    """Make every crash point of the engine append its name to the returned list (the engine
    must be imported already: its modules' own ``crash_point`` is what gets wrapped)."""
    from atomictools.engine.durable import steps

    reached: list[str] = []
    real = steps.crash_point

    def listing(name: str) -> None:
        reached.append(name)
        real(name)

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("atomictools") and getattr(module, "crash_point", None) is real:
            module.crash_point = listing  # type: ignore[attr-defined]
    return reached
