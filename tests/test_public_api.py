"""The public API: every name ``atomictools`` exports says what it guarantees.

Also: the layers import only downwards, and the server and the command line use only the
engine's public API (the import-linter contracts in pyproject.toml, run here too so a broken
contract fails the test suite, not only CI's lint step).
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import atomictools
import atomictools.engine

REPO = Path(__file__).resolve().parents[1]
NOT_DOCUMENTABLE = {"__version__", "Progress", "Params"}
"""A string and two type aliases: they cannot carry a docstring of their own."""


def own_docstring(obj: object) -> str:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return (doc or "").strip()


@pytest.mark.parametrize("name", sorted(set(atomictools.__all__) - NOT_DOCUMENTABLE))
def test_every_public_name_has_its_own_docstring(name: str) -> None:
    obj = getattr(atomictools, name)
    doc = own_docstring(obj)
    assert doc, f"atomictools.{name} has no docstring"
    assert not doc.startswith(f"{name}("), f"atomictools.{name} has only dataclass's signature"


def test_the_top_level_api_is_the_engines() -> None:
    """``atomictools`` re-exports the engine's public API and adds nothing of its own."""
    for name in set(atomictools.__all__) - {"__version__"}:
        assert getattr(atomictools, name) is getattr(atomictools.engine, name), name


def test_the_layer_contracts_hold() -> None:
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert linter is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    done = subprocess.run(
        [linter, "--no-cache"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_the_postgresql_database_is_public_and_loaded_on_first_use() -> None:
    """``from atomictools import PgDatabase`` works, documented; importing atomictools alone
    does not load the PostgreSQL driver (an optional extra)."""
    code = (
        "import sys, atomictools; loaded = 'psycopg' in sys.modules; "
        "from atomictools import PgDatabase; "
        "print(loaded, PgDatabase.__name__, 'psycopg' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.split() == ["False", "PgDatabase", "True"], done.stderr
    assert own_docstring(atomictools.PgDatabase)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = atomictools.Nope  # type: ignore[attr-defined]
