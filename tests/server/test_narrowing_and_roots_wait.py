"""Issue 11, defects 7, 8 and 9, through the real MCP client.

7. Client roots narrow the database tools too: a database file outside the client's roots is
   neither listed nor opened; an operator-named database (``--db``) stays available.
8. A client that declares the roots capability and never answers ``roots/list`` gets the
   configured roots after a bounded wait, inside the tool's deadline (it hung every call).
9. A source file truncated by another process while ``copy_file`` copies it is refused, not
   copied short and reported as a success.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from atomictools import ConcurrentChangeError, Workspace
from atomictools.engine.durable.steps import observe_steps
from atomictools.server import ServerOptions, create_server
from tests.conftest import temp_files
from tests.server.helpers import text_of
from tests.server.test_schemas_roots import roots_callback

pytestmark = pytest.mark.anyio


def make_db(path: Path, value: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE secrets (v TEXT)")
    conn.execute("INSERT INTO secrets VALUES (?)", (value,))
    conn.commit()
    conn.close()


@pytest.fixture
def dbs(root: Path) -> Path:
    root = root.resolve()
    for name in ("sub", "other"):
        (root / name).mkdir()
        make_db(root / name / f"{name}.db", f"{name} secret")
    make_db(root.parent / "named.db", "named by the operator")
    return root


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the database tools need asyncio
async def test_client_roots_narrow_the_database_tools(dbs: Path, anyio_backend: str) -> None:
    server = create_server(Workspace([dbs]), databases={"named": str(dbs.parent / "named.db")})
    callback = roots_callback([dbs / "sub"])
    async with Client(server, mode="legacy", list_roots_callback=callback) as client:
        listed = await client.call_tool("db_list", {})
        assert not listed.is_error, text_of(listed)
        assert listed.structured_content is not None
        names = [d["name"] for d in listed.structured_content["databases"]]
        assert names == ["named", "sub.db"], names  # other/other.db is outside the client root

        for tool, args in [
            ("db_query", {"sql": "SELECT v FROM secrets"}),
            ("db_schema", {}),
            ("db_execute", {"sql": "DELETE FROM secrets"}),
            ("db_transaction", {"statements": [{"sql": "DELETE FROM secrets"}]}),
        ]:
            refused = await client.call_tool(
                tool, {"database": str(dbs / "other" / "other.db"), **args}
            )
            assert refused.is_error, tool
            assert "outside the allowed directories" in text_of(refused), text_of(refused)

        inside = await client.call_tool(
            "db_query", {"database": "sub.db", "sql": "SELECT v FROM secrets"}
        )
        assert not inside.is_error, text_of(inside)
        named = await client.call_tool(
            "db_query", {"database": "named", "sql": "SELECT v FROM secrets"}
        )
        assert not named.is_error, text_of(named)
        assert "named by the operator" in text_of(named)

    conn = sqlite3.connect(dbs / "other" / "other.db")
    assert conn.execute("SELECT v FROM secrets").fetchall() == [("other secret",)]
    conn.close()


async def test_a_client_that_never_answers_roots_list_gets_the_configured_roots(
    root: Path,
) -> None:
    async def never(_context: Any) -> Any:
        await anyio.sleep_forever()

    server = create_server(Workspace([root]), ServerOptions(tool_timeout=2.0))
    async with Client(server, mode="legacy", list_roots_callback=never) as client:
        started = time.monotonic()
        with anyio.fail_after(10):
            first = await client.call_tool("write_file", {"path": "a.txt", "content": "a"})
        assert not first.is_error, text_of(first)
        assert time.monotonic() - started < 5  # half the 2 s deadline, not forever
        started = time.monotonic()
        second = await client.call_tool("read_text_file", {"path": "a.txt"})
        assert not second.is_error
        assert time.monotonic() - started < 0.5  # the fallback is kept for the session
    assert (root / "a.txt").read_text() == "a"


async def test_roots_wait_without_a_deadline_is_bounded_too(root: Path) -> None:
    async def never(_context: Any) -> Any:
        await anyio.sleep_forever()

    server = create_server(Workspace([root]), ServerOptions(roots_wait=0.3))
    async with Client(server, mode="legacy", list_roots_callback=never) as client:
        with anyio.fail_after(10):
            done = await client.call_tool("list_allowed_directories", {})
        assert not done.is_error
        assert str(root.resolve()) in text_of(done)


async def test_copy_of_a_source_truncated_meanwhile_is_refused(
    root: Path, anyio_backend: str
) -> None:
    source = root / "big.bin"
    source.write_bytes(os.urandom(4 * 1024 * 1024))  # four chunks
    ws = Workspace([root])
    chunks = 0

    def truncate_after_the_first_chunk(name: str) -> None:
        nonlocal chunks
        if name == "write.chunk":
            chunks += 1
            if chunks == 2:
                os.truncate(source, 1024 * 1024)  # another process, as far as the copy knows

    with (
        observe_steps(truncate_after_the_first_chunk),
        pytest.raises(ConcurrentChangeError) as excinfo,
    ):
        await ws.copy("big.bin", "copy.bin")
    message = str(excinfo.value)
    assert "big.bin changed while it was being read" in message
    assert message.endswith("nothing was changed")
    assert not (root / "copy.bin").exists()
    assert temp_files(root) == []
    done = await ws.copy("big.bin", "copy.bin")  # the next call works
    assert done.size == 1024 * 1024
