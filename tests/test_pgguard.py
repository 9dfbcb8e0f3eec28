"""PostgreSQL's statement guard (``pgguard``): which SQL may run where, and how placeholders
become ``$n``. Pure unit tests on PostgreSQL's own parser (pglast); no server is needed.

Every refusal is asserted with the words that make it actionable (what is refused, why, what
to do instead) and with the statement kind; every translation is asserted on the exact text
sent, so a change outside the placeholders shows up as a failure.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atomictools.engine.changes.markers import MARKER_TABLE
from atomictools.engine.db.pgguard import (
    BLOCKED_FUNCTIONS,
    GUARDED_SETTINGS,
    SESSION_LOCK_FUNCTIONS,
    PgStatementError,
    Prepared,
    prepare,
)

Params = list[Any] | tuple[Any, ...] | dict[str, Any] | None


def refused(sql: str, params: Params = None, *, read_only: bool = False) -> PgStatementError:
    with pytest.raises(PgStatementError) as caught:
        prepare(sql, params, read_only=read_only)
    return caught.value


def write(sql: str, params: Params = None) -> Prepared:
    return prepare(sql, params, read_only=False)


def read(sql: str, params: Params = None) -> Prepared:
    return prepare(sql, params, read_only=True)


# -- one statement -------------------------------------------------------------------------


@pytest.mark.parametrize("sql", ["", "   \n", ";", ";;", "-- only a comment", "/* c */ ;"])
def test_no_statement_is_refused(sql: str) -> None:
    err = refused(sql)
    assert "holds no statement" in str(err)


@pytest.mark.parametrize(
    ("sql", "count"),
    [
        ("SELECT 1; SELECT 2", 2),
        ("SELECT 1;SELECT 2;", 2),
        ("INSERT INTO t VALUES (1); DELETE FROM t; SELECT 1", 3),
        ("BEGIN; SELECT 1", 2),
    ],
)
@pytest.mark.parametrize("read_only", [False, True])
def test_several_statements_are_refused(sql: str, count: int, read_only: bool) -> None:
    err = refused(sql, read_only=read_only)
    assert f"holds {count} statements" in str(err)
    assert "send several statements as a list to Database.transaction" in str(err)


@pytest.mark.parametrize(
    "sql", ["SELECT 1;", "SELECT ';' AS semi", "SELECT $$a; b$$", "SELECT 1 -- ; SELECT 2"]
)
def test_one_statement_with_semicolons_inside_or_after_passes(sql: str) -> None:
    assert read(sql).sql == sql


def test_a_nul_character_is_refused() -> None:
    assert "NUL" in str(refused("SELECT 1\x00; DROP TABLE t"))


def test_sql_that_is_not_text_is_refused() -> None:
    assert "must be text" in str(refused(b"SELECT 1"))  # type: ignore[arg-type]


# -- syntax errors -------------------------------------------------------------------------


def test_a_syntax_error_gives_postgresqls_message_and_position() -> None:
    err = refused("SELEC 1")
    assert str(err) == (
        'PostgreSQL cannot parse the statement: syntax error at or near "SELEC" (line 1, column 1)'
    )
    assert err.kind is None


def test_a_syntax_error_on_a_later_line_gives_line_and_column() -> None:
    err = refused("SELECT a,\n       b\n  FROM FROM t")
    assert 'syntax error at or near "FROM" (line 3, column 8)' in str(err)


def test_the_position_is_in_the_callers_text_not_the_translation() -> None:
    # Each ? becomes $1..$10 (longer); the error must still point at the caller's FROM.
    sql = "SELECT " + ", ".join("?" for _ in range(10)) + ", FROM t"
    err = refused(sql, list(range(10)))
    assert f"(line 1, column {sql.index('FROM') + 1})" in str(err)


def test_an_error_at_a_placeholder_shows_the_callers_placeholder() -> None:
    err = refused("SELECT 'x' ?", ["v"])
    assert 'at or near "?" (line 1, column 12)' in str(err)
    assert "jsonb_exists" in str(err)


@pytest.mark.parametrize(
    "sql", ["SELECT 'unterminated", 'SELECT "unterminated', "SELECT $$ x", "SELECT /* x"]
)
def test_unterminated_literals_are_syntax_errors(sql: str) -> None:
    assert "unterminated" in str(refused(sql, [1]))


@pytest.mark.parametrize("sql", ["SELECT * FROM t WHERE id = ?", "SELECT * FROM t WHERE id = :id"])
def test_placeholders_without_params_fail_with_a_hint(sql: str) -> None:
    err = refused(sql)
    assert "PostgreSQL cannot parse the statement" in str(err)
    assert "need params" in str(err)


def test_a_jsonb_question_mark_without_params_is_no_placeholder() -> None:
    sql = "SELECT doc ? 'key' FROM t"
    assert read(sql) == Prepared(sql, (), "SelectStmt", True)
    assert read(sql, []).sql == sql
    assert read(sql, {}).sql == sql


# -- transaction control -------------------------------------------------------------------

TRANSACTION_CONTROL = [
    ("BEGIN", "BEGIN"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", "BEGIN"),
    ("begin read write", "BEGIN"),
    ("START TRANSACTION", "START TRANSACTION"),
    ("COMMIT", "COMMIT"),
    ("END", "COMMIT (or END)"),
    ("COMMIT AND CHAIN", "COMMIT"),
    ("ROLLBACK", "ROLLBACK"),
    ("ABORT", "ROLLBACK (or ABORT)"),
    ("SAVEPOINT a", "SAVEPOINT"),
    ("RELEASE a", "RELEASE SAVEPOINT"),
    ("RELEASE SAVEPOINT a", "RELEASE SAVEPOINT"),
    ("ROLLBACK TO a", "ROLLBACK TO SAVEPOINT"),
    ("ROLLBACK TO SAVEPOINT a", "ROLLBACK TO SAVEPOINT"),
    ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"),
    ("COMMIT PREPARED 'x'", "COMMIT PREPARED"),
    ("ROLLBACK PREPARED 'x'", "ROLLBACK PREPARED"),
]


@pytest.mark.parametrize(("sql", "label"), TRANSACTION_CONTROL)
@pytest.mark.parametrize("read_only", [False, True])
def test_transaction_control_is_refused(sql: str, label: str, read_only: bool) -> None:
    err = refused(sql, read_only=read_only)
    assert str(err).startswith(label)
    assert "the tool owns the transaction; send the statements as one list to " in str(err)
    assert "Database.transaction" in str(err)
    assert err.kind == "TransactionStmt"


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GUARDED_SETTINGS))
@pytest.mark.parametrize(
    "template",
    [
        "SET {name} = 'x'",
        "SET LOCAL {name} = 'x'",
        "SET SESSION {name} TO DEFAULT",
        "RESET {name}",
        "SELECT set_config('{name}', 'x', true)",
        "SELECT * FROM t WHERE a = (SELECT set_config('{name}', 'x', true))",
        "SELECT pg_catalog.set_config('{upper}', 'x', false)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET {name} = 'x' AS 'SELECT 1'",
        "ALTER FUNCTION f() SET {name} = 'x'",
    ],
)
def test_guarded_settings_cannot_be_changed_in_any_form(template: str, name: str) -> None:
    err = refused(template.format(name=name, upper=name.upper()))
    assert GUARDED_SETTINGS[name] in str(err)
    assert "not allowed" in str(err) or str(err).startswith("SELECT")
    assert err.kind is not None


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("SET ROLE postgres", "SET role is not allowed: it would change the role"),
        ("SET LOCAL ROLE postgres", "SET role is not allowed"),
        ("RESET ROLE", "RESET role is not allowed"),
        ("SET SESSION AUTHORIZATION postgres", "SET session_authorization is not allowed"),
        ("SET SESSION AUTHORIZATION DEFAULT", "SET session_authorization is not allowed"),
        ("RESET SESSION AUTHORIZATION", "RESET session_authorization is not allowed"),
        ("RESET ALL", "RESET ALL is not allowed: it would also reset the tool's own settings"),
        ("SET TRANSACTION READ WRITE", "SET TRANSACTION is not allowed"),
        ("SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED", "SET TRANSACTION is not allowed"),
        ("SET TRANSACTION SNAPSHOT '00000003-1'", "SET TRANSACTION SNAPSHOT is not allowed"),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SET SESSION CHARACTERISTICS is not allowed",
        ),
    ],
)
@pytest.mark.parametrize("read_only", [False, True])
def test_role_and_transaction_mode_statements_are_refused(
    sql: str, words: str, read_only: bool
) -> None:
    err = refused(sql, read_only=read_only)
    assert words in str(err)
    assert err.kind == "VariableSetStmt"


@pytest.mark.parametrize(
    "sql",
    [
        "SET search_path = app",
        "SET SESSION search_path = app",
        "SET TIME ZONE 'UTC'",
        "SET work_mem TO DEFAULT",
        "SET search_path FROM CURRENT",
    ],
)
def test_a_session_setting_would_outlive_the_call_and_is_refused(sql: str) -> None:
    err = refused(sql)
    assert "without LOCAL is not allowed" in str(err)
    assert "outlive this call on the shared connection" in str(err)
    assert "SET LOCAL" in str(err)


@pytest.mark.parametrize(
    "sql",
    [
        "SET LOCAL search_path = app, public",
        "SET LOCAL work_mem = '64MB'",
        "SET LOCAL TIME ZONE 'UTC'",
        "RESET search_path",
        "SET CONSTRAINTS ALL DEFERRED",
        "SELECT set_config('search_path', 'app', true)",
        "SELECT set_config('app.user_id', $1, true)",
    ],
)
def test_transaction_local_settings_are_allowed(sql: str) -> None:
    params = [7] if "$1" in sql else None
    assert write(sql, params).sql == sql


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("SELECT set_config($1, 'on', true)", "not a string literal"),
        ("SELECT set_config(name, 'on', true) FROM settings", "not a string literal"),
        ("SELECT set_config('ro' || 'le', 'boss', true)", "not a string literal"),
        ("SELECT set_config('search_path', 'app', false)", "pass true as the third argument"),
        ("SELECT set_config('search_path', 'app', $1)", "pass true as the third argument"),
        ("SELECT set_config('role', 'boss', false)", "would change the role"),
        ("SELECT set_config('Role', 'boss', true)", "would change the role"),
    ],
)
def test_set_config_is_refused_unless_a_literal_unguarded_local_setting(
    sql: str, words: str
) -> None:
    err = refused(sql, ["x"] if "$1" in sql else None)
    assert words in str(err)
    assert str(err).startswith("SELECT is not allowed: ")


# -- COPY ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("COPY t TO PROGRAM 'cat > /tmp/x'", "COPY ... TO PROGRAM is not allowed: it runs a shell"),
        ("COPY t FROM PROGRAM 'id'", "COPY ... FROM PROGRAM is not allowed: it runs a shell"),
        ("COPY t FROM '/etc/passwd'", "COPY ... FROM a file is not allowed: it reads or writes"),
        ("COPY t TO '/tmp/out.csv' (FORMAT csv)", "COPY ... TO a file is not allowed"),
        ("COPY t FROM STDIN", "COPY ... FROM STDIN is not allowed: it needs the COPY protocol"),
        ("COPY t TO STDOUT", "COPY ... TO STDOUT is not allowed"),
        ("COPY (SELECT 1) TO STDOUT WITH (FORMAT csv)", "COPY ... TO STDOUT is not allowed"),
    ],
)
@pytest.mark.parametrize("read_only", [False, True])
def test_every_copy_is_refused(sql: str, words: str, read_only: bool) -> None:
    err = refused(sql, read_only=read_only)
    assert words in str(err)
    assert "INSERT ... VALUES" in str(err)
    assert err.kind == "CopyStmt"


def test_copy_to_stdout_says_it_would_leave_the_connection_stuck() -> None:
    assert "stuck" in str(refused("COPY t TO STDOUT"))


# -- statements refused on every connection ------------------------------------------------

REFUSED = [
    ("DO $$ BEGIN COMMIT; END $$", "DoStmt", "DO is not allowed"),
    ("DO $$ BEGIN EXECUTE 'SET ROLE boss'; END $$", "DoStmt", "change the role"),
    ("CALL p()", "CallStmt", "CALL is not allowed: a procedure can COMMIT"),
    ("LISTEN jobs", "ListenStmt", "keep listening on the shared connection"),
    ("UNLISTEN jobs", "UnlistenStmt", "UNLISTEN is not allowed"),
    ("UNLISTEN *", "UnlistenStmt", "UNLISTEN is not allowed"),
    ("PREPARE q AS SELECT 1", "PrepareStmt", "prepared statements would outlive this call"),
    ("EXECUTE q", "ExecuteStmt", "EXECUTE is not allowed"),
    ("DEALLOCATE q", "DeallocateStmt", "DEALLOCATE is not allowed"),
    ("DEALLOCATE ALL", "DeallocateStmt", "DEALLOCATE is not allowed"),
    ("DECLARE c CURSOR FOR SELECT 1", "DeclareCursorStmt", "cursors are not available"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DeclareCursorStmt", "WITH HOLD"),
    ("FETCH 10 FROM c", "FetchStmt", "FETCH or MOVE is not allowed"),
    ("MOVE c", "FetchStmt", "FETCH or MOVE is not allowed"),
    ("CLOSE c", "ClosePortalStmt", "CLOSE is not allowed"),
    ("CLOSE ALL", "ClosePortalStmt", "CLOSE is not allowed"),
    ("DISCARD ALL", "DiscardStmt", "would reset the shared connection"),
    ("DISCARD TEMP", "DiscardStmt", "DISCARD is not allowed"),
    ("LOAD 'plpython3u'", "LoadStmt", "loads a shared library"),
    ("ALTER SYSTEM SET work_mem = '1GB'", "AlterSystemStmt", "server's configuration"),
    ("ALTER SYSTEM RESET ALL", "AlterSystemStmt", "ALTER SYSTEM is not allowed"),
    ("VACUUM", "VacuumStmt", "cannot run inside a transaction block"),
    ("VACUUM FULL t", "VacuumStmt", "VACUUM is not allowed"),
    ("VACUUM ANALYZE t", "VacuumStmt", "ANALYZE alone is allowed"),
    ("CHECKPOINT", "CheckPointStmt", "CHECKPOINT is not allowed"),
    ("CREATE DATABASE d", "CreatedbStmt", "CREATE DATABASE is not allowed"),
    ("DROP DATABASE d", "DropdbStmt", "DROP DATABASE is not allowed"),
    ("ALTER DATABASE d CONNECTION LIMIT 1", "AlterDatabaseStmt", "the operator's job"),
    ("ALTER DATABASE d SET statement_timeout = 0", "AlterDatabaseSetStmt", "databases"),
    ("ALTER DATABASE d REFRESH COLLATION VERSION", "AlterDatabaseRefreshCollStmt", "databases"),
    ("ALTER DATABASE d RENAME TO e", "RenameStmt", "ALTER DATABASE (renaming a database)"),
    ("ALTER DATABASE d OWNER TO r", "AlterOwnerStmt", "changing a database's owner"),
    ("CREATE ROLE r", "CreateRoleStmt", "role management is the operator's job"),
    ("CREATE USER u PASSWORD 'x'", "CreateRoleStmt", "for every agent"),
    ("CREATE GROUP g", "CreateRoleStmt", "CREATE ROLE (or USER, GROUP) is not allowed"),
    ("ALTER ROLE r SUPERUSER", "AlterRoleStmt", "who can do what"),
    ("ALTER USER u PASSWORD 'y'", "AlterRoleStmt", "ALTER ROLE (or USER, GROUP)"),
    ("ALTER GROUP g ADD USER u", "AlterRoleStmt", "role management"),
    ("ALTER ROLE r SET search_path = x", "AlterRoleSetStmt", "ALTER ROLE ... SET"),
    ("ALTER ROLE r RENAME TO s", "RenameStmt", "ALTER ROLE (renaming a role)"),
    ("DROP ROLE r", "DropRoleStmt", "DROP ROLE (or USER, GROUP) is not allowed"),
    ("DROP USER IF EXISTS u", "DropRoleStmt", "role management"),
    ("GRANT boss TO app", "GrantRoleStmt", "GRANT or REVOKE of a role membership"),
    ("REVOKE boss FROM app", "GrantRoleStmt", "privileges on objects are allowed"),
    ("REASSIGN OWNED BY a TO b", "ReassignOwnedStmt", "REASSIGN OWNED is not allowed"),
    ("DROP OWNED BY a", "DropOwnedStmt", "DROP OWNED is not allowed"),
    ("CREATE TABLESPACE ts LOCATION '/tmp/ts'", "CreateTableSpaceStmt", "file system"),
    ("DROP TABLESPACE ts", "DropTableSpaceStmt", "tablespaces are directories"),
    ("ALTER TABLESPACE ts SET (seq_page_cost = 1)", "AlterTableSpaceOptionsStmt", "tablespace"),
    ("ALTER TABLESPACE ts RENAME TO tt", "RenameStmt", "renaming a tablespace"),
    ("CREATE FOREIGN DATA WRAPPER w", "CreateFdwStmt", "connects this database to another"),
    ("CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw", "CreateForeignServerStmt", "server"),
    ("ALTER SERVER s OPTIONS (SET host 'evil')", "AlterForeignServerStmt", "another server"),
    ("CREATE USER MAPPING FOR app SERVER s", "CreateUserMappingStmt", "password"),
    ("IMPORT FOREIGN SCHEMA x FROM SERVER s INTO y", "ImportForeignSchemaStmt", "another"),
    (
        "CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p",
        "CreateSubscriptionStmt",
        "another server",
    ),
    ("DROP SUBSCRIPTION s", "DropSubscriptionStmt", "DROP SUBSCRIPTION is not allowed"),
]


@pytest.mark.parametrize(("sql", "kind", "words"), REFUSED)
@pytest.mark.parametrize("read_only", [False, True])
def test_statements_refused_on_every_connection(
    sql: str, kind: str, words: str, read_only: bool
) -> None:
    err = refused(sql, read_only=read_only)
    assert words in str(err)
    assert "is not allowed: " in str(err)
    assert "Database.query only reads" not in str(err)  # the policy refusal comes first
    assert err.kind == kind


# -- functions that reach outside ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BLOCKED_FUNCTIONS))
def test_blocked_functions_are_refused(name: str) -> None:
    err = refused(f"SELECT {name}('x')")
    assert f"the function {name}() {BLOCKED_FUNCTIONS[name]}" in str(err)
    assert err.kind == "SelectStmt"


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ("SELECT PG_READ_FILE('/etc/passwd')", "pg_read_file"),
        ("SELECT pg_catalog.pg_read_file('/etc/passwd')", "pg_read_file"),
        ('SELECT "pg_catalog"."pg_read_file"(\'/etc/passwd\')', "pg_read_file"),
        ("SELECT U&\"pg\\005fread_file\"('/etc/passwd')", "pg_read_file"),
        ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
        ("SELECT * FROM ROWS FROM (pg_ls_waldir())", "pg_ls_waldir"),
        ("SELECT pg_file_write('x', 'y', false)", "pg_file_write"),
        ("SELECT dblink('host=x', 'SELECT 1')", "dblink"),
        ("SELECT public.dblink_exec('host=x', 'DROP TABLE t')", "dblink_exec"),
        ("SELECT dblink_connect_u('c', 'host=x')", "dblink_connect_u"),
        ("SELECT lo_import('/etc/passwd')", "lo_import"),
        ("SELECT x FROM t WHERE y = (SELECT pg_terminate_backend(1))", "pg_terminate_backend"),
        ("WITH f AS (SELECT pg_stat_file('x')) SELECT * FROM f", "pg_stat_file"),
        ("INSERT INTO t VALUES (pg_read_binary_file('/etc/shadow'))", "pg_read_binary_file"),
        ("UPDATE t SET a = pg_cancel_backend(b)", "pg_cancel_backend"),
        ("CREATE TABLE t (a text DEFAULT pg_read_file('x'))", "pg_read_file"),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql "
            "BEGIN ATOMIC SELECT pg_read_file('x'); END",
            "pg_read_file",
        ),
        ("EXPLAIN SELECT pg_reload_conf()", "pg_reload_conf"),
    ],
)
def test_blocked_functions_are_found_anywhere_in_any_spelling(sql: str, name: str) -> None:
    err = refused(sql)
    assert f"the function {name}()" in str(err)
    assert "is not allowed: " in str(err)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'pg_read_file(''/etc/passwd'')' AS text",
        "SELECT pg_read_file FROM t",  # a column, not a call
        'SELECT "pg_read_file" FROM t',
        "SELECT $$ SELECT dblink('x') $$",
        "SELECT 1 -- pg_read_file('x')",
    ],
)
def test_function_names_in_literals_comments_or_columns_are_not_calls(sql: str) -> None:
    assert read(sql).kind == "SelectStmt"


@pytest.mark.parametrize("name", sorted(SESSION_LOCK_FUNCTIONS))
def test_session_advisory_locks_are_refused_with_the_transaction_variant(name: str) -> None:
    err = refused(f"SELECT {name}(42)")
    assert "session-level lock that would outlive this call" in str(err)
    assert f"use {SESSION_LOCK_FUNCTIONS[name]}()" in str(err)
    assert read(f"SELECT {SESSION_LOCK_FUNCTIONS[name]}(42)").reads_only


# -- temporary objects ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "what"),
    [
        ("CREATE TEMP TABLE x (a int)", "table"),
        ("CREATE TEMPORARY TABLE x (a int) ON COMMIT DELETE ROWS", "table"),
        ("CREATE TABLE pg_temp.x (a int)", "table"),
        ("CREATE TEMP TABLE x AS SELECT 1", "table"),
        ("SELECT 1 AS a INTO TEMP x", "table"),
        ("CREATE TEMP VIEW v AS SELECT 1", "view"),
        ("CREATE TEMP SEQUENCE s", "sequence"),
        ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "function"),
    ],
)
def test_temporary_objects_would_outlive_the_call_and_are_refused(sql: str, what: str) -> None:
    err = refused(sql)
    assert f"a temporary {what} (" in str(err)
    assert "outlive this call on the shared connection" in str(err)
    assert ("ON COMMIT DROP" in str(err)) == (what == "table")


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TEMP TABLE x (a int) ON COMMIT DROP",
        "CREATE TEMP TABLE x ON COMMIT DROP AS SELECT 1",
        "CREATE UNLOGGED TABLE u (a int)",
        "SELECT 1 AS a INTO kept",
    ],
)
def test_temporary_tables_dropped_at_commit_and_regular_ones_are_allowed(sql: str) -> None:
    assert not write(sql).reads_only


# -- atomictools' own marker table ---------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        f"INSERT INTO {MARKER_TABLE} VALUES ('x', 'y', 0)",
        f"UPDATE {MARKER_TABLE} SET record = ''",
        f"DELETE FROM {MARKER_TABLE}",
        f"DELETE FROM public.{MARKER_TABLE.upper()}",
        f"TRUNCATE {MARKER_TABLE}",
        f"DROP TABLE {MARKER_TABLE}",
        f"ALTER TABLE {MARKER_TABLE} ADD COLUMN x int",
        f"ALTER TABLE mine RENAME TO {MARKER_TABLE}",
        f"CREATE TABLE {MARKER_TABLE} (txid text)",
        f"CREATE TRIGGER t BEFORE INSERT ON {MARKER_TABLE} FOR EACH ROW EXECUTE FUNCTION f()",
        f"WITH d AS (DELETE FROM {MARKER_TABLE} RETURNING 1) SELECT * FROM d",
    ],
)
def test_the_change_set_marker_table_cannot_be_changed(sql: str) -> None:
    err = refused(sql)
    assert f"the table {MARKER_TABLE} holds atomictools' change-set commit markers" in str(err)
    assert "can be read with Database.query, not changed" in str(err)


def test_the_change_set_marker_table_can_be_read() -> None:
    assert read(f"SELECT txid FROM {MARKER_TABLE} WHERE txid = ?", ["x"]).reads_only


# -- what is allowed -----------------------------------------------------------------------

WRITES = [
    ("INSERT INTO t (a, b) VALUES (1, 'x') RETURNING id", "InsertStmt"),
    ("INSERT INTO t SELECT * FROM s ON CONFLICT DO NOTHING", "InsertStmt"),
    ("UPDATE t SET a = a + 1 WHERE id = 1", "UpdateStmt"),
    ("DELETE FROM t WHERE id = 1", "DeleteStmt"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "MergeStmt"),
    ("CREATE TABLE t (id bigserial PRIMARY KEY, doc jsonb)", "CreateStmt"),
    ("ALTER TABLE t ADD COLUMN c text", "AlterTableStmt"),
    ("DROP TABLE IF EXISTS t", "DropStmt"),
    ("CREATE INDEX ON t (a)", "IndexStmt"),
    ("CREATE VIEW v AS SELECT 1", "ViewStmt"),
    ("CREATE SCHEMA app", "CreateSchemaStmt"),
    ("CREATE EXTENSION IF NOT EXISTS pgcrypto", "CreateExtensionStmt"),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$",
        "CreateFunctionStmt",
    ),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = app AS 'SELECT 1'", None),
    ("TRUNCATE t", "TruncateStmt"),
    ("COMMENT ON TABLE t IS 'x'", "CommentStmt"),
    ("GRANT SELECT ON t TO reporting", "GrantStmt"),
    ("ALTER TABLE t OWNER TO app", "AlterTableStmt"),
    ("ALTER FUNCTION f() OWNER TO app", "AlterOwnerStmt"),
    ("NOTIFY jobs, 'payload'", "NotifyStmt"),
    ("ANALYZE t", "VacuumStmt"),
    ("LOCK TABLE t IN SHARE MODE", "LockStmt"),
    ("SELECT * FROM t FOR UPDATE", "SelectStmt"),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT count(*) FROM d", "SelectStmt"),
    ("EXPLAIN ANALYZE SELECT 1", "ExplainStmt"),
    ("EXPLAIN ANALYZE DELETE FROM t", "ExplainStmt"),
    ("SELECT nextval('s')", "SelectStmt"),
    ("SELECT pg_notify('jobs', 'x')", "SelectStmt"),
]


@pytest.mark.parametrize(("sql", "kind"), WRITES)
def test_writes_are_allowed_on_the_write_connection(sql: str, kind: str | None) -> None:
    prepared = write(sql)
    assert prepared.sql == sql
    assert prepared.params == ()
    assert prepared.kind == (kind or "CreateFunctionStmt")
    assert not prepared.reads_only


READS = [
    ("SELECT 1", "SelectStmt"),
    ("select * from t where a > 1 order by a limit 10", "SelectStmt"),
    ("VALUES (1, 'a'), (2, 'b')", "SelectStmt"),
    ("TABLE t", "SelectStmt"),
    ("SELECT 1 UNION ALL SELECT 2 EXCEPT SELECT 3", "SelectStmt"),
    ("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT * FROM c", None),
    ("WITH x AS MATERIALIZED (SELECT 1) SELECT * FROM x", "SelectStmt"),
    ("SELECT * FROM (SELECT a FROM t) s JOIN u USING (a)", "SelectStmt"),
    ("SELECT doc @? '$.a' FROM t", "SelectStmt"),
    ("SHOW work_mem", "VariableShowStmt"),
    ("SHOW ALL", "VariableShowStmt"),
    ("SHOW search_path", "VariableShowStmt"),
    ("EXPLAIN SELECT * FROM t", "ExplainStmt"),
    ("EXPLAIN (FORMAT JSON, VERBOSE) SELECT * FROM t", "ExplainStmt"),
    ("EXPLAIN (ANALYZE false) SELECT 1", "ExplainStmt"),
    ("EXPLAIN (ANALYZE off, COSTS) VALUES (1)", "ExplainStmt"),
    ("SELECT current_setting('search_path'), now()", "SelectStmt"),
    ("SELECT set_config('search_path', 'app', true)", "SelectStmt"),
    ("SELECT pg_advisory_xact_lock(1)", "SelectStmt"),
]


@pytest.mark.parametrize(("sql", "kind"), READS)
@pytest.mark.parametrize("read_only", [True, False])
def test_reads_are_allowed_everywhere(sql: str, kind: str | None, read_only: bool) -> None:
    prepared = prepare(sql, None, read_only=read_only)
    assert prepared == Prepared(sql, (), kind or "SelectStmt", True)


# -- the read-only policy ------------------------------------------------------------------

NOT_READS = [
    ("INSERT INTO t VALUES (1)", "(INSERT) inserts rows"),
    ("UPDATE t SET a = 1", "(UPDATE) updates rows"),
    ("DELETE FROM t", "(DELETE) deletes rows"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "(MERGE) merges rows"),
    ("CREATE TABLE t (a int)", "(CREATE TABLE) is not a read"),
    ("DROP TABLE t", "(DROP TABLE) is not a read"),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "changes rows in its WITH clause"),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING a) SELECT a FROM i", "WITH clause"),
    ("WITH u AS (UPDATE t SET a = 2 RETURNING a) VALUES (1)", "WITH clause"),
    ("SELECT * FROM s WHERE EXISTS (WITH d AS (DELETE FROM t RETURNING 1) SELECT 1)", "WITH"),
    ("SELECT * FROM t FOR UPDATE", "locks rows (FOR UPDATE or FOR SHARE)"),
    ("SELECT * FROM t FOR SHARE SKIP LOCKED", "locks rows"),
    ("SELECT * FROM t FOR NO KEY UPDATE NOWAIT", "locks rows"),
    ("SELECT * FROM t FOR KEY SHARE", "locks rows"),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", "locks rows"),
    ("SELECT 1 FROM t UNION SELECT 2 FROM u FOR UPDATE", "locks rows"),
    ("SELECT * INTO copy FROM t", "(SELECT INTO) creates a table"),
    ("EXPLAIN ANALYZE SELECT 1", "runs the statement it explains (EXPLAIN ANALYZE)"),
    ("EXPLAIN (ANALYZE) SELECT 1", "EXPLAIN ANALYZE"),
    ("EXPLAIN (ANALYZE true, BUFFERS) SELECT 1", "EXPLAIN ANALYZE"),
    ("EXPLAIN (ANALYZE on) SELECT 1", "EXPLAIN ANALYZE"),
    ("EXPLAIN ANALYZE VERBOSE DELETE FROM t", "EXPLAIN ANALYZE"),
    ("EXPLAIN DELETE FROM t", "explains a DELETE, which is not a read"),
    ("EXPLAIN SELECT * FROM t FOR UPDATE", "locks rows"),
    ("SELECT nextval('s')", "calls nextval(), which advances a sequence"),
    ("SELECT setval('s', 1)", "calls setval()"),
    ("SELECT pg_notify('jobs', 'x')", "calls pg_notify(), which sends a notification"),
    ("NOTIFY jobs", "(NOTIFY) sends a notification"),
    ("SET LOCAL search_path = app", "(SET) changes a setting"),
    ("LOCK TABLE t", "(LOCK) locks tables"),
    ("ANALYZE t", "(ANALYZE) is not a read"),
    ("CREATE TEMP TABLE x (a int) ON COMMIT DROP", "(CREATE TABLE) is not a read"),
]


@pytest.mark.parametrize(("sql", "words"), NOT_READS)
def test_the_read_only_policy_refuses_anything_but_a_read(sql: str, words: str) -> None:
    err = refused(sql, read_only=True)
    assert str(err).startswith("Database.query only reads, and this statement ")
    assert words in str(err)
    assert str(err).endswith(": use Database.execute")
    assert err.kind is not None
    assert not write(sql).reads_only


# -- placeholders --------------------------------------------------------------------------

TRANSLATIONS: list[tuple[str, Any, str, tuple[Any, ...]]] = [
    # ? and ?NNN with a list.
    (
        "SELECT * FROM t WHERE a = ? AND b = ?",
        [1, 2],
        "SELECT * FROM t WHERE a = $1 AND b = $2",
        (1, 2),
    ),
    ("SELECT ?", ("only",), "SELECT $1", ("only",)),
    (
        "SELECT * FROM t WHERE a=? AND b<>? AND c!=?",
        [1, 2, 3],
        "SELECT * FROM t WHERE a=$1 AND b<>$2 AND c!=$3",
        (1, 2, 3),
    ),
    (
        "SELECT * FROM t WHERE a>=? AND b<=? AND c<? AND d>?",
        [1, 2, 3, 4],
        "SELECT * FROM t WHERE a>=$1 AND b<=$2 AND c<$3 AND d>$4",
        (1, 2, 3, 4),
    ),
    (
        "SELECT a+?, b-?, c*?, d||?",
        [1, 2, 3, "x"],
        "SELECT a+$1, b-$2, c*$3, d||$4",
        (1, 2, 3, "x"),
    ),
    (
        "SELECT * FROM t WHERE a IN (?,?,?)",
        [1, 2, 3],
        "SELECT * FROM t WHERE a IN ($1,$2,$3)",
        (1, 2, 3),
    ),
    ("SELECT ?2, ?1, ?2", ["a", "b"], "SELECT $2, $1, $2", ("a", "b")),
    ("SELECT * FROM t WHERE a=?1 OR b=?1", [5], "SELECT * FROM t WHERE a=$1 OR b=$1", (5,)),
    ("SELECT ?02, ?01", ["a", "b"], "SELECT $2, $1", ("a", "b")),
    # Literals, comments and quoted identifiers are never touched.
    ("SELECT '?', 'a:b', ? FROM t", [1], "SELECT '?', 'a:b', $1 FROM t", (1,)),
    ("SELECT 'it''s ? :x', ?", [1], "SELECT 'it''s ? :x', $1", (1,)),
    ("SELECT E'\\'?', E'\\\\', ?", [1], "SELECT E'\\'?', E'\\\\', $1", (1,)),
    (
        "SELECT U&'d\\0061?', B'101', X'ff', N'?', ?",
        [1],
        "SELECT U&'d\\0061?', B'101', X'ff', N'?', $1",
        (1,),
    ),
    ("SELECT $$ ? :x ' $$, $f$ ?; :y $f$, ?", [1], "SELECT $$ ? :x ' $$, $f$ ?; :y $f$, $1", (1,)),
    (
        "SELECT /* ? /* :x */ ? */ ? -- ? :y\n, ?",
        [1, 2],
        "SELECT /* ? /* :x */ ? */ $1 -- ? :y\n, $2",
        (1, 2),
    ),
    ('SELECT "?col", "a:b", ? FROM "t?"', [1], 'SELECT "?col", "a:b", $1 FROM "t?"', (1,)),
    ("SELECT 'é漢🙂' || ?, ?", ["x", "y"], "SELECT 'é漢🙂' || $1, $2", ("x", "y")),
    # Casts, := and => are not placeholders.
    (
        "SELECT ?::int, x::text FROM t WHERE y = ?::date",
        [1, "2024-01-01"],
        "SELECT $1::int, x::text FROM t WHERE y = $2::date",
        (1, "2024-01-01"),
    ),
    ("SELECT f(a := ?, b => ?)", [1, 2], "SELECT f(a := $1, b => $2)", (1, 2)),
    # jsonb's ?| ?& and jsonpath's @? stay operators.
    (
        "SELECT * FROM t WHERE j ?| array['a'] AND j ?& array['b'] AND j @? '$.a' AND x = ?",
        [1],
        "SELECT * FROM t WHERE j ?| array['a'] AND j ?& array['b'] AND j @? '$.a' AND x = $1",
        (1,),
    ),
    # Native $n with a list.
    ("SELECT $2, $1, $2", ["a", "b"], "SELECT $2, $1, $2", ("a", "b")),
    ("SELECT 'a%' || $1", ["b"], "SELECT 'a%' || $1", ("b",)),
    # :name with a mapping.
    (
        "SELECT * FROM t WHERE a = :a AND b = :b",
        {"a": 1, "b": 2},
        "SELECT * FROM t WHERE a = $1 AND b = $2",
        (1, 2),
    ),
    ("SELECT :b, :a, :b, :a", {"a": 1, "b": 2}, "SELECT $1, $2, $1, $2", (2, 1)),
    (
        "SELECT :name, :type, :order, :user, :select, :value",
        {"name": "n", "type": "t", "order": 1, "user": "u", "select": "s", "value": "v"},
        "SELECT $1, $2, $3, $4, $5, $6",
        ("n", "t", 1, "u", "s", "v"),
    ),
    ("SELECT :Name, :name", {"Name": 1, "name": 2}, "SELECT $1, $2", (1, 2)),
    (
        "SELECT :a::int, x::text, f(k := :a, j => :b)",
        {"a": 1, "b": 2},
        "SELECT $1::int, x::text, f(k := $1, j => $2)",
        (1, 2),
    ),
    (
        "SELECT arr[1:2], arr[1:n], arr[:n], arr[n:], arr[lo:hi], :a",
        {"a": 1},
        "SELECT arr[1:2], arr[1:n], arr[:n], arr[n:], arr[lo:hi], $1",
        (1,),
    ),
    (
        "SELECT (ARRAY[1, 2, 3])[1:n], (f(x))[a:b][c], :a",
        {"a": 1},
        "SELECT (ARRAY[1, 2, 3])[1:n], (f(x))[a:b][c], $1",
        (1,),
    ),
    (
        "SELECT ARRAY[:a, :b], ARRAY[[:a], [:b]], arr[(:i)]",
        {"a": 1, "b": 2, "i": 3},
        "SELECT ARRAY[$1, $2], ARRAY[[$1], [$2]], arr[($3)]",
        (1, 2, 3),
    ),
    ("SELECT ARRAY[arr[1:n], :a]", {"a": 1}, "SELECT ARRAY[arr[1:n], $1]", (1,)),
    (
        "SELECT JSON_OBJECT('k':v, 'a': :a, 'b' : :b, 'c' VALUE :c, :d: :e)",
        {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
        "SELECT JSON_OBJECT('k':v, 'a': $1, 'b' : $2, 'c' VALUE $3, $4: $5)",
        (1, 2, 3, 4, 5),
    ),
    (
        "SELECT JSON_OBJECTAGG(k: :v), JSON_OBJECTAGG(k:v) FROM t",
        {"v": 1},
        "SELECT JSON_OBJECTAGG(k: $1), JSON_OBJECTAGG(k:v) FROM t",
        (1,),
    ),
    (
        "SELECT ':a', \":a\", $$:a$$, :a -- :a",
        {"a": 1},
        "SELECT ':a', \":a\", $$:a$$, $1 -- :a",
        (1,),
    ),
    (
        "SELECT * FROM t WHERE j ? 'k' AND x = :x",
        {"x": 1},
        "SELECT * FROM t WHERE j ? 'k' AND x = $1",
        (1,),
    ),
    (
        "INSERT INTO t VALUES (:id, :doc::jsonb)",
        {"id": 1, "doc": '{"a": 1}'},
        "INSERT INTO t VALUES ($1, $2::jsonb)",
        (1, '{"a": 1}'),
    ),
]


@pytest.mark.parametrize(("sql", "params", "expected", "values"), TRANSLATIONS)
def test_placeholders_become_dollar_numbers_and_nothing_else_changes(
    sql: str, params: Any, expected: str, values: tuple[Any, ...]
) -> None:
    prepared = write(sql, params)
    assert prepared.sql == expected
    assert prepared.params == values


def test_no_params_means_no_translation() -> None:
    sql = "SELECT 'x ? :y', 1"
    assert read(sql).sql == sql
    assert read(sql, []).sql == sql


def test_a_tuple_of_params_works_like_a_list() -> None:
    assert read("SELECT ?, ?", (1, 2)).params == (1, 2)


@pytest.mark.parametrize("params", ["ab", b"ab", 5, {1, 2}])
def test_params_must_be_a_list_or_a_mapping(params: Any) -> None:
    assert "params must be a list" in str(refused("SELECT ?", params))


# -- placeholder and value counts ----------------------------------------------------------

MISMATCHES: list[tuple[str, Any, str]] = [
    ("SELECT ?, ?", [1], "the statement has 2 ? placeholders but params holds 1 value"),
    ("SELECT ?", [1, 2], "the statement has 1 ? placeholder but params holds 2 values"),
    ("SELECT ?2", [1, 2], "never uses ?1"),
    ("SELECT ?3, ?1", [1, 2], "?3 has no value: params holds 2 values (?1 to ?2)"),
    ("SELECT $1", [1, 2], "params holds 2 values, but the statement never uses $2"),
    ("SELECT $1, $3", [1, 2, 3], "never uses $2"),
    ("SELECT $3", [1, 2], "$3 has no value: params holds 2 values ($1 to $2)"),
    ("SELECT $0", [1], "$0 has no value"),
    ("SELECT $1", None, "the statement uses $1 but no params were given"),
    ("SELECT $1", [], "the statement uses $1 but no params were given"),
    ("SELECT $2", {}, "the statement uses $2 but no params were given"),
    ("SELECT 1", [1], "params holds 1 value, but the statement has no placeholders"),
    ("SELECT :a, :b", {"a": 1}, "params has no value for :b (it holds a)"),
    ("SELECT :a", {"a": 1, "b": 2}, "params holds b, which the statement does not use"),
    ("SELECT 1", {"a": 1}, "params is a mapping of 1 value, but the statement has no :name"),
]


@pytest.mark.parametrize(("sql", "params", "words"), MISMATCHES)
def test_a_count_mismatch_is_refused(sql: str, params: Any, words: str) -> None:
    err = refused(sql, params)
    assert words in str(err)
    assert err.kind == "SelectStmt"


def test_a_quoted_identifier_after_a_colon_is_no_name() -> None:
    err = refused('SELECT :"a"', {"a": 1})
    assert "the statement has no :name placeholders" in str(err)


def test_the_jsonb_question_mark_collision_gets_a_hint() -> None:
    err = refused("SELECT * FROM t WHERE doc ? 'k' AND id = ?", [1])
    assert "the statement has 2 ? placeholders but params holds 1 value" in str(err)
    assert "jsonb_exists(doc, key)" in str(err)
    # With as many values as question marks, the parser complains at the jsonb key instead.
    err = refused("SELECT * FROM t WHERE doc ? 'k' AND id = ?", [1, 2])
    assert "syntax error at or near \"'k'\"" in str(err)
    assert "jsonb_exists(doc, key)" in str(err)
    # The fix the hint gives works.
    fixed = write("SELECT * FROM t WHERE jsonb_exists(doc, 'k') AND id = ?", [1])
    assert fixed.sql == "SELECT * FROM t WHERE jsonb_exists(doc, 'k') AND id = $1"


@pytest.mark.parametrize(
    ("sql", "params", "words"),
    [
        ("SELECT ?, $1", [1], "mixes ? and $n placeholders"),
        ("SELECT ?, ?1", [1], "mixes ? and ?NNN placeholders"),
        ("SELECT ?1, $2", [1, 2], "mixes ?NNN and $n placeholders"),
        ("SELECT $1, :a", {"a": 1}, "mixes $n placeholders with :name ones"),
        ("SELECT ?, :a", [1], "uses :a, a :name placeholder, but params is a list"),
        ("SELECT :a", [1], "pass params as a mapping for :name placeholders"),
    ],
)
def test_mixing_placeholder_styles_is_refused(sql: str, params: Any, words: str) -> None:
    assert words in str(refused(sql, params))


def test_a_refused_statement_is_reported_before_its_placeholders() -> None:
    assert "the tool owns the transaction" in str(refused("BEGIN", [1]))
    assert "Database.query only reads" in str(refused("DELETE FROM t", [1], read_only=True))


# -- the result ----------------------------------------------------------------------------


def test_prepared_is_frozen_and_carries_the_kind() -> None:
    prepared = write("UPDATE t SET a = :a", {"a": 1})
    assert prepared == Prepared("UPDATE t SET a = $1", (1,), "UpdateStmt", False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prepared.sql = "DROP TABLE t"  # type: ignore[misc]


def test_a_refusal_is_a_value_error_with_the_kind() -> None:
    err = refused("LISTEN x")
    assert isinstance(err, ValueError)
    assert err.kind == "ListenStmt"


# -- property: nothing outside the placeholders changes ------------------------------------

_WORDS = st.text(alphabet="?:$'\"ab -é漢\\*/;", max_size=12)


def _quoted(text: str, quote: str) -> str:
    return quote + text.replace(quote, quote * 2) + quote


_FRAGMENTS = st.one_of(
    _WORDS.map(lambda text: _quoted(text, "'")),  # 'it''s ? :x'
    st.lists(st.sampled_from(["?", ":x", "a", "\\'", "\\\\", "::", "$1", "é"]), max_size=6).map(
        lambda parts: "E'" + "".join(parts) + "'"
    ),
    _WORDS.filter(lambda text: "$" not in text).map(lambda text: f"$q${text}$q$"),
    _WORDS.filter(lambda text: text.strip('"')).map(lambda text: _quoted(text, '"')),
    _WORDS.filter(lambda text: "*" not in text and "/" not in text).map(
        lambda text: f"1 /* {text} */"
    ),
    _WORDS.map(lambda text: f"2 -- {text}\n"),
    st.sampled_from(
        ["3::int", "'x'::text", "(ARRAY[1, 2])[1:2]", "f(a := 1)", "x", "4.5e1", "-6", "(7)"]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.just("?"), _FRAGMENTS), min_size=1, max_size=12))
def test_translating_question_marks_changes_nothing_outside_them(fragments: list[str]) -> None:
    count = 0
    expected: list[str] = []
    for fragment in fragments:
        if fragment == "?":
            count += 1
            expected.append(f"${count}")
        else:
            expected.append(fragment)
    sql = "SELECT " + ", ".join(fragments)
    prepared = read(sql, list(range(count)) or None)
    assert prepared.sql == "SELECT " + ", ".join(expected)
    assert prepared.params == tuple(range(count))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([":a", ":b", ":type"]), _FRAGMENTS), min_size=1))
def test_translating_names_changes_nothing_outside_them(fragments: list[str]) -> None:
    numbers: dict[str, int] = {}
    expected = [
        f"${numbers.setdefault(f, len(numbers) + 1)}" if f.startswith(":") else f for f in fragments
    ]
    sql = "SELECT " + ", ".join(fragments)
    prepared = read(sql, {name[1:]: name for name in numbers} or None)
    assert prepared.sql == "SELECT " + ", ".join(expected)
    assert prepared.params == tuple(numbers)


def test_messages_name_no_internal_helpers() -> None:
    # Every message is for a person: no Python reprs or JSON node dumps leak into it.
    for sql, *_ in REFUSED:
        assert not re.search(r"[{}]|<|'kind'", str(refused(sql)))
