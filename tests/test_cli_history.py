"""``atomictools history`` and ``atomictools undo``, run as real subprocesses.

The changes are made through the library (the history the CLI reads is the one a server
writes); the CLI runs with ``--state-dir`` of the test. Each test checks the files on disk, the
exit code (0 done, 1 refused, 2 usage) and that errors are one clear line, no traceback.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from atomictools import Change, Workspace
from atomictools.cli.history import duration_arg, size_arg
from tests.conftest import temp_files
from tests.conftest import tree_snapshot as snapshot


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atomictools", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("atomictools: "), done.stderr
    return done.stderr


@pytest.fixture
def project(root: Path, private_state_dir: Path) -> tuple[Path, Path, str]:
    """A root where an agent wrote two files, then changed both (and made a third) in one set.

    Returns (root, state dir, the change set's id)."""

    async def agent() -> str:
        ws = Workspace([root], state_dir=private_state_dir)
        await ws.write("app.py", "import util\nprint(util.answer())\n")
        await ws.write("util.py", "def answer():\n    return 42\n")
        done = await ws.apply_changes(
            [
                Change("write", "util.py", content=b"def answer():\n    return 41\n"),
                Change("write", "extra.py", content=b"x = 1\n"),
                Change("delete", "app.py"),
            ]
        )
        assert done.change_id is not None
        return done.change_id

    return root, private_state_dir, anyio.run(agent)


def test_history_json_lists_newest_first(project: tuple[Path, Path, str]) -> None:
    root, state, set_id = project
    done = run_cli("history", str(root), "--json", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["changes"]
    assert [c["op"] for c in listed] == ["apply_changes", "write", "write"]
    assert listed[0]["id"] == set_id
    assert listed[0]["undoable"] is True
    assert listed[0]["time"].endswith("Z")
    paths = {p["path"]: p for p in listed[0]["paths"]}
    assert set(paths) == {"util.py", "extra.py", "app.py"}
    assert (paths["util.py"]["added"], paths["util.py"]["removed"]) == (1, 1)
    assert (paths["app.py"]["before"], paths["app.py"]["after"]) == ("file", "absent")
    assert "blob" not in paths["util.py"]

    limited = run_cli("history", str(root), "--json", "--limit", "1", "--state-dir", str(state))
    assert [c["id"] for c in json.loads(limited.stdout)["changes"]] == [set_id]
    one_file = run_cli("history", str(root), "--json", "--path", "app.py")
    assert [c["op"] for c in json.loads(one_file.stdout)["changes"]] == ["apply_changes", "write"]
    future = run_cli("history", str(root), "--json", "--since", "2099-01-01")
    assert json.loads(future.stdout) == {"changes": []}


def test_history_table_marks_undos(project: tuple[Path, Path, str]) -> None:
    root, state, set_id = project
    undone = run_cli("undo", str(root), set_id, "--state-dir", str(state))
    assert undone.returncode == 0, undone.stderr
    done = run_cli("history", str(root), "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIME", "(local)", "OP", "PATHS"]
    assert " undo " in lines[1]
    assert f"[undoes {set_id}]" in lines[1]
    assert lines[2].startswith(set_id)
    assert "apply_changes" in lines[2]
    assert "util.py +1 -1" in lines[2]
    assert "app.py (deleted)" in lines[2]
    assert "extra.py (new) +1 -0" in lines[2]
    assert "atomictools undo" in lines[-1]


def test_undo_by_id_restores_every_file(project: tuple[Path, Path, str]) -> None:
    root, state, set_id = project
    done = run_cli("undo", str(root), set_id, "--json", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["applied"] is True
    assert out["undone"] == [set_id]
    assert {p["path"]: p["action"] for p in out["paths"]} == {
        "app.py": "restored",
        "util.py": "restored",
        "extra.py": "deleted",
    }
    assert (root / "util.py").read_text() == "def answer():\n    return 42\n"
    assert (root / "app.py").read_text() == "import util\nprint(util.answer())\n"
    assert not (root / "extra.py").exists()
    assert temp_files(root) == []

    # Redo: undo the undo (its id was printed); the ID may come after the options too.
    redo = run_cli("undo", str(root), "--state-dir", str(state), out["changeId"])
    assert redo.returncode == 0, redo.stderr
    assert f"undid {out['changeId']}" in redo.stdout
    assert (root / "util.py").read_text() == "def answer():\n    return 41\n"
    assert not (root / "app.py").exists()


def test_undo_last_and_the_text_report(project: tuple[Path, Path, str]) -> None:
    root, state, set_id = project
    done = run_cli("undo", str(root), "--last", "1", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"undid {set_id}, all paths in one atomic change:")
    assert "restored" in done.stdout
    assert "util.py" in done.stdout
    assert "deleted" in done.stdout
    assert "extra.py" in done.stdout
    assert "to redo: atomictools undo" in done.stdout
    assert not (root / "extra.py").exists()


def test_undo_dry_run_prints_diffs_and_changes_nothing(
    project: tuple[Path, Path, str], tmp_path: Path
) -> None:
    root, state, set_id = project
    before = snapshot(tmp_path, exclude=state)
    done = run_cli("undo", str(root), set_id, "--dry-run", "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert "dry run: nothing was changed" in done.stdout
    assert "-    return 41" in done.stdout
    assert "+    return 42" in done.stdout
    assert "+print(util.answer())" in done.stdout
    assert snapshot(tmp_path, exclude=state) == before
    listed = run_cli("history", str(root), "--json", "--state-dir", str(state))
    assert len(json.loads(listed.stdout)["changes"]) == 3  # no entry for a dry run


def test_undo_conflict_exits_1_naming_the_path(
    project: tuple[Path, Path, str], tmp_path: Path
) -> None:
    root, state, set_id = project
    (root / "util.py").write_text("edited by a person\n")
    before = snapshot(tmp_path, exclude=state)
    done = run_cli("undo", str(root), set_id, "--state-dir", str(state))
    assert done.returncode == 1
    message = one_line_error(done)
    assert "util.py was changed" in message
    assert "--force" in message
    assert "--path" in message
    assert "nothing was changed" in message
    assert snapshot(tmp_path, exclude=state) == before

    # --path: only the files nobody touched since
    partial = run_cli("undo", str(root), set_id, "--path", "app.py", "--path", "extra.py")
    assert partial.returncode == 0, partial.stderr
    assert (root / "app.py").exists()
    assert not (root / "extra.py").exists()
    assert (root / "util.py").read_text() == "edited by a person\n"

    # --force: the old version anyway
    forced = run_cli("undo", str(root), set_id, "--force", "--state-dir", str(state))
    assert forced.returncode == 0, forced.stderr
    assert (root / "util.py").read_text() == "def answer():\n    return 42\n"


def test_refusals_exit_1_and_usage_errors_exit_2(project: tuple[Path, Path, str]) -> None:
    root, state, set_id = project
    unknown = run_cli("undo", str(root), "0123456789", "--state-dir", str(state))
    assert unknown.returncode == 1
    assert "no recorded change '0123456789'" in one_line_error(unknown)
    assert "atomictools history" in unknown.stderr

    no_id = run_cli("undo", str(root))
    assert no_id.returncode == 2
    assert "--last" in one_line_error(no_id)
    both = run_cli("undo", str(root), set_id, "--last", "1")
    assert both.returncode == 2
    assert "not both" in one_line_error(both)
    for bad in ("0", "101", "many"):
        assert run_cli("undo", str(root), "--last", bad).returncode == 2
    since = run_cli("history", str(root), "--since", "yesterday")
    assert since.returncode == 2
    assert "neither a time" in one_line_error(since)
    missing = run_cli("history", str(root / "nope"))
    assert missing.returncode == 2
    one_line_error(missing)
    assert (root / "util.py").read_text() == "def answer():\n    return 41\n"


def test_serve_history_flags_parse_and_show_their_defaults() -> None:
    assert size_arg("1073741824") == 1 << 30
    assert size_arg("1G") == 1 << 30
    assert size_arg("500M") == 500 << 20
    assert size_arg("512K") == 512 << 10
    assert size_arg("2GiB") == 2 << 30
    assert duration_arg("30d") == 30 * 86400
    assert duration_arg("12h") == 12 * 3600
    assert duration_arg("90") == 90
    for bad in ("lots", "-1G", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            size_arg(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        duration_arg("soon")
    shown = run_cli("serve", "--help")
    assert shown.returncode == 0
    flat = " ".join(shown.stdout.split())
    assert "--no-history" in flat
    assert "(default 1G)" in flat
    assert "(default 30d)" in flat
    refused = run_cli("serve", "--root", ".", "--history-max-bytes", "lots")
    assert refused.returncode == 2
    assert "not a size" in refused.stderr


def test_a_mixed_change_shows_its_database_part_and_undoes_its_files_only_when_named(
    root: Path, private_state_dir: Path
) -> None:
    from atomictools import Database

    async def agent() -> str:
        ws = Workspace([root])
        await ws.write("models.py", "FIELDS = ['name']\n")
        async with Database(root / "app.db", create=True) as db:
            await db.execute("CREATE TABLE users (name TEXT)")
            async with ws.changeset() as cs:
                cs.write("models.py", "FIELDS = ['name', 'email']\n")
                cs.sql(db, "ALTER TABLE users ADD COLUMN email TEXT")
        assert cs.result is not None
        assert cs.result.change_id is not None
        return cs.result.change_id

    change_id = anyio.run(agent, backend="asyncio")
    listed = run_cli("history", str(root), "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    line = listed.stdout.splitlines()[1]
    assert line.startswith(change_id)
    assert "models.py +1 -1, database app.db: 1 statement(s), 0 row(s)" in line
    assert "[database part not undoable: undo its files with --path]" in line
    refused = run_cli("undo", str(root), change_id)
    assert refused.returncode == 1
    assert "name the files in paths" in refused.stderr
    assert (root / "models.py").read_text() == "FIELDS = ['name', 'email']\n"
    done = run_cli("undo", str(root), change_id, "--path", "models.py")
    assert done.returncode == 0, done.stderr
    assert (root / "models.py").read_text() == "FIELDS = ['name']\n"
