"""``list_changes`` and ``undo_change`` end to end through the SDK's ``mcp.Client``.

The checks run as ``test_tools_e2e`` runs its own: in memory (one test per check, both protocol
eras) and over stdio (``python -m atomictools serve`` as a subprocess, every check in one
session). The files on disk are compared with what each result claims: an undo must put every
byte back, a dry run and a refused undo must change nothing at all. Then the cases that need a
server of their own: read-only, a client's narrowed roots, a database call's audit entry, and
the serve flags ``--no-history``, ``--history-max-bytes`` and ``--history-max-age``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from atomictools import Workspace
from atomictools.server import create_server
from atomictools.server.models import (
    ApplyChangesOutput,
    DirectoryOutput,
    EditOutput,
    ListChangesOutput,
    MoveOutput,
    UndoChangeOutput,
    WriteOutput,
)
from tests.conftest import tree_snapshot as snapshot
from tests.server.test_schemas_roots import roots_callback

from .helpers import Env, connect, sha, stdio_params, text_of

pytestmark = pytest.mark.anyio

Check = Callable[[Env], Awaitable[None]]
CHECKS: list[Check] = []


def check(func: Check) -> Check:
    CHECKS.append(func)
    return func


def check_id(func: Check) -> str:
    return func.__name__.removeprefix("check_")


async def changes(env: Env, **args: Any) -> list[dict[str, Any]]:
    """The recorded changes below the check's own directory, newest first."""
    out = await env.ok("list_changes", {"path": env.name, **args}, ListChangesOutput)
    return list(out["changes"])


def files(env: Env) -> dict[str, bytes]:
    return {
        str(p.relative_to(env.d)): p.read_bytes() for p in sorted(env.d.rglob("*")) if p.is_file()
    }


async def bad_change_set(env: Env) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Three files in place, then one change set over all of them (an agent's bad refactor):
    an edit, a new file, a delete and a new directory. Returns its result and the files before."""
    env.f("app.py").write_text("import util\n\nprint(util.answer())\n")
    env.f("util.py").write_text("def answer():\n    return 42\n")
    env.f("notes.md").write_text("keep me\n")
    before = files(env)
    result = await env.result(
        "apply_changes",
        {
            "changes": [
                {
                    "op": "edit",
                    "path": env.p("app.py"),
                    "edits": [{"oldText": "util.answer()", "newText": "helpers.answer()"}],
                },
                {"op": "write", "path": env.p("util.py"), "content": "# emptied by mistake\n"},
                {"op": "delete", "path": env.p("notes.md")},
                {"op": "mkdir", "path": env.p("pkg")},
                {"op": "write", "path": env.p("pkg/helpers.py"), "content": "x = 1\n"},
            ]
        },
        ApplyChangesOutput,
    )
    out = result.structured_content
    assert out is not None
    assert out["changeId"]
    # The text a model reads says how to take the set back.
    assert f"recorded as change {out['changeId']}: undo_change" in text_of(result)
    return out, before


# -- list_changes ------------------------------------------------------------------------------


@check
async def check_list_changes_shows_every_change_newest_first(env: Env) -> None:
    first = await env.ok(
        "write_file", {"path": env.p("a.txt"), "content": "one\ntwo\n"}, WriteOutput
    )
    await env.ok(
        "edit_file",
        {"path": env.p("a.txt"), "edits": [{"oldText": "two", "newText": "TWO\nthree"}]},
        EditOutput,
    )
    await env.ok("create_directory", {"path": env.p("sub")}, DirectoryOutput)
    await env.ok(
        "move_file", {"source": env.p("a.txt"), "destination": env.p("sub/a.txt")}, MoveOutput
    )
    listed = await changes(env)
    assert [c["op"] for c in listed] == ["move", "mkdir", "edit", "write"]
    write, edit = listed[3], listed[2]
    assert write["paths"] == [
        {
            "path": env.p("a.txt"),
            "before": "absent",
            "after": "file",
            "beforeSha256": None,
            "beforeSize": None,
            "afterSha256": first["sha256"],
            "afterSize": 8,
            "movedFrom": None,
            "added": 2,
            "removed": 0,
            "pruned": False,
        }
    ]
    assert (edit["paths"][0]["added"], edit["paths"][0]["removed"]) == (2, 1)
    assert all(c["undoable"] for c in listed)
    moved = {p["path"]: p for p in listed[0]["paths"]}
    assert moved[env.p("sub/a.txt")]["movedFrom"] == env.p("a.txt")
    assert moved[env.p("a.txt")]["after"] == "absent"

    # The text carries what the model needs: ids, ops, paths with line counts.
    result = await env.call("list_changes", {"path": env.name})
    text = text_of(result)
    for entry in listed:
        assert entry["id"] in text
        assert entry["time"] in text
    assert f"{env.p('a.txt')} (created, +2 -0)" in text
    assert f"{env.p('a.txt')} (+2 -1)" in text
    assert f"{env.p('sub/a.txt')} (moved from {env.p('a.txt')}" in text
    assert "undo_change" in text

    # limit, and whether more exist
    one = await env.ok("list_changes", {"path": env.name, "limit": 1}, ListChangesOutput)
    assert [c["id"] for c in one["changes"]] == [listed[0]["id"]]
    assert one["truncated"] is True
    assert (await env.ok("list_changes", {"path": env.name}, ListChangesOutput))["truncated"] is (
        False
    )
    # since: a duration back from now, or an ISO time (what an entry's `time` is)
    assert len(await changes(env, since="1h")) == 4
    assert await changes(env, since="2099-01-01T00:00:00Z") == []
    recent = await changes(env, since=listed[0]["time"])
    assert recent[0]["id"] == listed[0]["id"]
    await env.error("list_changes", {"since": "yesterday"}, "since='yesterday'", "30m")
    await env.error("list_changes", {"limit": 0}, "limit")
    # path: one file's changes only
    only = await env.ok("list_changes", {"path": env.p("sub/a.txt")}, ListChangesOutput)
    assert [c["op"] for c in only["changes"]] == ["move"]


# -- undo_change ---------------------------------------------------------------------------


@check
async def check_undo_last_takes_back_a_whole_change_set(env: Env) -> None:
    applied, before = await bad_change_set(env)
    change_id = applied["changeId"]
    assert change_id
    assert listed_ids(await changes(env))[0] == change_id

    result = await env.call("undo_change", {"last": 1})
    assert not result.is_error, text_of(result)
    out = UndoChangeOutput.model_validate(result.structured_content).model_dump(by_alias=True)
    assert out["applied"] is True
    assert out["undone"] == [change_id]
    assert out["changeId"]
    assert files(env) == before
    assert not env.f("pkg").exists()
    actions = {p["path"]: p["action"] for p in out["paths"]}
    assert actions == {
        env.p("app.py"): "restored",
        env.p("util.py"): "restored",
        env.p("notes.md"): "restored",
        env.p("pkg/helpers.py"): "deleted",
        env.p("pkg"): "removed_directory",
    }
    restored = {p["path"]: p for p in out["paths"]}
    assert restored[env.p("util.py")]["sha256"] == sha(before["util.py"])
    text = text_of(result)
    assert f"Undid change {change_id}" in text
    for path in actions:
        assert path in text
    assert out["changeId"] in text  # how to redo it

    # The undo is a change of its own, listed as the undo of the set.
    newest = (await changes(env))[0]
    assert newest["op"] == "undo"
    assert newest["id"] == out["changeId"]
    assert newest["undoes"] == [change_id]
    assert f"undo of {change_id}" in text_of(await env.call("list_changes", {"path": env.name}))


def listed_ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in entries]


@check
async def check_undo_by_id_leaves_later_changes_to_other_files(env: Env) -> None:
    env.f("a.txt").write_text("a1\n")
    env.f("b.txt").write_text("b1\n")
    await env.ok("write_file", {"path": env.p("a.txt"), "content": "a2\n"}, WriteOutput)
    await env.ok("write_file", {"path": env.p("b.txt"), "content": "b2\n"}, WriteOutput)
    older = (await changes(env))[1]
    assert older["paths"][0]["path"] == env.p("a.txt")
    out = await env.ok("undo_change", {"id": older["id"]}, UndoChangeOutput)
    assert out["undone"] == [older["id"]]
    assert env.f("a.txt").read_text() == "a1\n"
    assert env.f("b.txt").read_text() == "b2\n"  # the later change, to another file, stays


@check
async def check_dry_run_returns_diffs_and_changes_nothing(env: Env) -> None:
    applied, _ = await bad_change_set(env)
    count = len(await changes(env))
    disk = snapshot(env.d)
    result = await env.call("undo_change", {"id": applied["changeId"], "dryRun": True})
    assert not result.is_error, text_of(result)
    out = result.structured_content
    assert out is not None
    UndoChangeOutput.model_validate(out)
    assert out["applied"] is False
    assert out["changeId"] is None
    diffs = {p["path"]: p["diff"] for p in out["paths"]}
    assert "-# emptied by mistake\n" in diffs[env.p("util.py")]
    assert "+    return 42\n" in diffs[env.p("util.py")]
    assert "+print(util.answer())" in diffs[env.p("app.py")]
    text = text_of(result)
    assert "Dry run" in text
    assert "nothing was changed" in text
    assert "```diff" in text
    assert "+    return 42" in text
    assert snapshot(env.d) == disk  # not one byte, inode or mtime
    assert len(await changes(env)) == count  # and no history entry


@check
async def check_conflict_is_refused_naming_the_path_then_paths_and_force(env: Env) -> None:
    applied, before = await bad_change_set(env)
    # A later change to util.py, after the set.
    later = await env.ok(
        "write_file", {"path": env.p("util.py"), "content": "# fixed by hand\n"}, WriteOutput
    )
    disk = snapshot(env.d)
    message = await env.error(
        "undo_change", {"id": applied["changeId"]}, env.p("util.py"), "force", "paths"
    )
    assert "changed after it" in message
    assert snapshot(env.d) == disk

    # paths: restore only the files that were not changed since.
    partial = await env.ok(
        "undo_change",
        {"id": applied["changeId"], "paths": [env.p("app.py"), env.p("notes.md")]},
        UndoChangeOutput,
    )
    assert {p["path"] for p in partial["paths"]} == {env.p("app.py"), env.p("notes.md")}
    assert env.f("app.py").read_bytes() == before["app.py"]
    assert env.f("notes.md").read_bytes() == before["notes.md"]
    assert env.f("util.py").read_text() == "# fixed by hand\n"
    assert env.f("pkg/helpers.py").exists()
    await env.error(
        "undo_change",
        {"id": applied["changeId"], "paths": [env.p("never.txt")]},
        "was not changed by change",
    )

    # force: the old version comes back over the later change, which stays undoable.
    forced = await env.ok(
        "undo_change", {"id": applied["changeId"], "force": True}, UndoChangeOutput
    )
    assert files(env) == before
    assert forced["changeId"]
    # The overwritten change stays in the history (undoing the forced undo brings it back).
    assert any(p["afterSha256"] == later["sha256"] for c in await changes(env) for p in c["paths"])
    await env.ok("undo_change", {"id": forced["changeId"]}, UndoChangeOutput)
    assert env.f("util.py").read_text() == "# fixed by hand\n"


@check
async def check_undoing_the_undo_redoes(env: Env) -> None:
    applied, before = await bad_change_set(env)
    after = files(env)
    undo = await env.ok("undo_change", {"last": 1}, UndoChangeOutput)
    assert files(env) == before
    redo = await env.ok("undo_change", {"id": undo["changeId"]}, UndoChangeOutput)
    assert redo["undone"] == [undo["changeId"]]
    assert files(env) == after
    assert env.f("pkg").is_dir()
    # And last=1 right after is the undo of the redo: the files go back once more.
    await env.ok("undo_change", {"last": 1}, UndoChangeOutput)
    assert files(env) == before
    ops = [c["op"] for c in await changes(env)]
    assert ops[:4] == ["undo", "undo", "undo", "apply_changes"]
    assert applied["changeId"] in listed_ids(await changes(env))


@check
async def check_undo_errors_say_what_to_send(env: Env) -> None:
    await env.error("undo_change", {}, "give either id or last")
    await env.error("undo_change", {"id": "0123456789", "last": 1}, "give either id or last")
    await env.error("undo_change", {"id": "nosuchid99"}, "no recorded change", "list_changes")
    await env.error("undo_change", {"last": 0}, "last")
    await env.error("undo_change", {"last": 101}, "last")
    await env.error("undo_change", {"id": ""}, "id")


@check
async def check_annotations(env: Env) -> None:
    tools = {tool.name: tool for tool in (await env.client.list_tools()).tools}
    listing, undo = tools["list_changes"], tools["undo_change"]
    assert listing.annotations is not None
    assert listing.annotations.read_only_hint is True
    assert listing.annotations.open_world_hint is False
    assert undo.annotations is not None
    assert undo.annotations.read_only_hint is False
    assert undo.annotations.destructive_hint is True
    assert undo.annotations.idempotent_hint is False
    assert undo.annotations.open_world_hint is False
    assert set(undo.input_schema["properties"]) == {"id", "last", "paths", "dryRun", "force"}
    assert set(listing.input_schema["properties"]) == {"path", "since", "limit"}
    assert undo.output_schema is not None
    assert listing.output_schema is not None
    assert "last=1" in (undo.description or "")
    assert "changeId" in tools["apply_changes"].output_schema["properties"]  # type: ignore[index]


# -- the runs ------------------------------------------------------------------------------------


@pytest.fixture(params=["legacy", "default"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.usefixtures("no_temps_left")
@pytest.mark.parametrize("check_fn", CHECKS, ids=check_id)
async def test_in_memory(check_fn: Check, mode: str, root: Path, tmp_path: Path) -> None:
    async with connect(create_server(Workspace([root])), mode) as client:
        await check_fn(Env.make(client, root, tmp_path, check_id(check_fn)))


@pytest.mark.usefixtures("no_temps_left")
async def test_stdio_every_check(mode: str, root: Path, tmp_path: Path) -> None:
    """One real server subprocess serves every check in one session (one shared history)."""
    failures: list[str] = []
    async with connect(stdio_params(root), mode) as client:
        for check_fn in CHECKS:
            env = Env.make(client, root, tmp_path, check_id(check_fn))
            try:
                await check_fn(env)
            except AssertionError as err:
                failures.append(f"{check_id(check_fn)}: {err}")
        await env.alive()
    assert not failures, "\n\n".join(failures)


# -- servers of their own ------------------------------------------------------------------------


async def test_read_only_server_lists_and_previews_but_refuses_undo(
    mode: str, root: Path, tmp_path: Path
) -> None:
    (root / "ro").mkdir()
    (root / "ro" / "a.txt").write_text("old\n")
    await Workspace([root]).write("ro/a.txt", "new\n")
    async with connect(create_server(Workspace([root], read_only=True)), mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"list_changes", "undo_change"} <= names
        assert "write_file" not in names
        env = Env(client, root, tmp_path, "ro")
        [entry] = await changes(env)
        assert entry["op"] == "write"
        before = snapshot(tmp_path)
        await env.error("undo_change", {"last": 1}, "read-only", "dryRun")
        await env.error("undo_change", {"id": entry["id"]}, "read-only")
        preview = await env.ok("undo_change", {"last": 1, "dryRun": True}, UndoChangeOutput)
        assert preview["applied"] is False
        assert preview["paths"][0]["diff"].endswith("-new\n+old\n")
        assert snapshot(tmp_path) == before
        assert (root / "ro" / "a.txt").read_text() == "new\n"


async def test_client_roots_bound_what_is_listed_and_undone(root: Path) -> None:
    (root / "mine").mkdir()
    (root / "theirs").mkdir()
    ws = Workspace([root])
    await ws.write("theirs/t.txt", "t\n")
    await ws.write("mine/m.txt", "m\n")
    [theirs] = await ws.history_entries(path="theirs")
    callback = roots_callback([root / "mine"])
    async with Client(
        create_server(Workspace([root])), mode="legacy", list_roots_callback=callback
    ) as client:
        listed = await client.call_tool("list_changes", {})
        assert not listed.is_error, text_of(listed)
        assert listed.structured_content is not None
        shown = listed.structured_content["changes"]
        assert [[p["path"] for p in c["paths"]] for c in shown] == [["m.txt"]]
        assert "t.txt" not in text_of(listed)
        refused = await client.call_tool("undo_change", {"id": theirs.id})
        assert refused.is_error
        assert "no recorded change" in text_of(refused)
        # last=1 is the newest change inside the client's roots, not the server's.
        await ws.write("theirs/t.txt", "t2\n")
        undone = await client.call_tool("undo_change", {"last": 1})
        assert not undone.is_error, text_of(undone)
    assert not (root / "mine" / "m.txt").exists()
    assert (root / "theirs" / "t.txt").read_text() == "t2\n"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the database tools need asyncio
async def test_database_calls_are_listed_for_audit_and_cannot_be_undone(
    root: Path, tmp_path: Path
) -> None:
    server = create_server(Workspace([root]), databases={"main": tmp_path / "main.db"})
    async with connect(server, "legacy") as client:
        env = Env(client, root, tmp_path, ".")
        for sql in ("CREATE TABLE t (x)", "INSERT INTO t VALUES (1)"):
            done = await client.call_tool("db_execute", {"database": "main", "sql": sql})
            assert not done.is_error, text_of(done)
        out = await env.ok("list_changes", {"limit": 1}, ListChangesOutput)
        [entry] = out["changes"]
        assert entry["op"] == "db_execute"
        assert entry["database"] == "main"
        assert entry["statements"] == ["INSERT INTO t VALUES (1)"]
        assert entry["rowsChanged"] == 1
        assert entry["undoable"] is False
        text = text_of(await client.call_tool("list_changes", {"limit": 1}))
        assert "database call" in text
        assert "cannot be undone" in text
        assert "INSERT INTO t VALUES (1)" in text
        await env.error("undo_change", {"id": entry["id"]}, "database", "cannot be undone")


async def _poll_changes(client: Client, until: Callable[[list[dict[str, Any]]], bool]) -> str:
    """list_changes until ``until`` holds for its changes (the start's retention pass runs in
    the background); returns the last text."""
    deadline = time.monotonic() + 15
    while True:
        result = await client.call_tool("list_changes", {})
        assert not result.is_error, text_of(result)
        assert result.structured_content is not None
        if until(result.structured_content["changes"]):
            return text_of(result)
        assert time.monotonic() < deadline, text_of(result)
        await anyio.sleep(0.05)


async def test_serve_no_history_records_nothing(root: Path) -> None:
    async with Client(stdio_params(root, "--no-history"), mode="legacy") as client:
        written = await client.call_tool("write_file", {"path": "a.txt", "content": "x\n"})
        assert not written.is_error, text_of(written)
        listed = await client.call_tool("list_changes", {})
        assert listed.structured_content == {"changes": [], "truncated": False}
        assert "No recorded changes" in text_of(listed)
        refused = await client.call_tool("undo_change", {"last": 1})
        assert refused.is_error
        assert "no recorded change" in text_of(refused) or "no history" in text_of(refused)
    assert (root / "a.txt").read_text() == "x\n"


async def test_serve_history_max_bytes_prunes_at_start(root: Path) -> None:
    (root / "p.txt").write_text("v1\n")
    await Workspace([root]).write("p.txt", "v2\n")
    params = stdio_params(root, "--history-max-bytes", "0")
    async with Client(params, mode="legacy") as client:
        text = await _poll_changes(client, lambda found: not found[0]["undoable"])
        assert "cannot be undone" in text
        refused = await client.call_tool("undo_change", {"last": 1})
        assert refused.is_error
        assert "pruned" in text_of(refused)
    assert (root / "p.txt").read_text() == "v2\n"


async def test_serve_history_max_age_forgets_old_changes_at_start(root: Path) -> None:
    await Workspace([root]).write("old.txt", "old\n")
    await anyio.sleep(1.2)
    params = stdio_params(root, "--history-max-age", "1s")
    async with Client(params, mode="legacy") as client:
        written = await client.call_tool("write_file", {"path": "new.txt", "content": "new\n"})
        assert not written.is_error, text_of(written)
        await _poll_changes(
            client, lambda found: [c["paths"][0]["path"] for c in found] == ["new.txt"]
        )
