"""The journal record of a change set: its fields, its encoding, and what makes it trustworthy.

One module owns the record so the writer (``journal``) and the reader (``recovery``) cannot
drift apart. The record is JSON with a sha256 checksum of its canonical form; ``decode`` either
returns a fully typed record or raises ``UntrustedRecordError`` saying why it cannot be trusted
(empty, torn, garbage, checksum mismatch, a field missing or of the wrong type, a version this
code does not know). Recovery never acts on a record it cannot trust: it only reports it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

RECORD_SUFFIX = ".journal.json"
RECORD_VERSION = 2
"""2: members are named after their change set and a claim points to the record. A set with a
database step adds the state ``prepared`` and the field ``database`` (a reader that does not
know them refuses the record as untrusted: it never guesses)."""

OpKind = Literal["replace", "delete", "move", "rmdir"]
State = Literal["preparing", "prepared", "committed"]
"""``preparing``: never committed (rolled back). ``committed``: rolled forward. ``prepared``: a
set with a database step, whose commit point is that database's COMMIT: its marker decides."""
_OP_KINDS = ("replace", "delete", "move", "rmdir")
_STATES = ("preparing", "prepared", "committed")


class UntrustedRecordError(ValueError):
    """The record cannot be used to decide anything; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class OpRecord:
    """One rename or unlink a committed change set makes, with what rolls it back."""

    op: OpKind
    dir: str
    """The target's directory (absolute)."""
    name: str
    staged: str | None
    """The staged new content's name in ``dir`` (replace only)."""
    backup: str | None
    """The hard-linked backup of the target's old version, in ``dir``."""
    sha256: str | None
    """The target's content once applied (replace only)."""
    source_dir: str | None = None
    source_name: str | None = None
    link: str | None = None
    """A second name of a file the set creates, in ``dir`` (an undo checks the inode)."""

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "op": self.op,
            "dir": self.dir,
            "name": self.name,
            "staged": self.staged,
            "backup": self.backup,
            "sha256": self.sha256,
            "link": self.link,
        }
        if self.op == "move":
            entry["source_dir"] = self.source_dir
            entry["source_name"] = self.source_name
        return entry

    @classmethod
    def from_json(cls, raw: Any, where: str) -> OpRecord:
        fields = _object(raw, where)
        op = _text(fields, "op", where)
        if op not in _OP_KINDS:
            raise UntrustedRecordError(f"{where}.op is {op!r}, not one of {', '.join(_OP_KINDS)}")
        move = op == "move"
        return cls(
            op=op,  # type: ignore[arg-type]  # checked against _OP_KINDS above
            dir=_text(fields, "dir", where),
            name=_text(fields, "name", where),
            staged=_optional_text(fields, "staged", where),
            backup=_optional_text(fields, "backup", where),
            sha256=_optional_text(fields, "sha256", where),
            link=_optional_text(fields, "link", where),
            source_dir=_text(fields, "source_dir", where) if move else None,
            source_name=_text(fields, "source_name", where) if move else None,
        )


@dataclass(frozen=True, slots=True)
class JournalRecord:
    txid: str
    state: State
    pid: int
    created: float
    durability: str
    ops: tuple[OpRecord, ...]
    created_dirs: tuple[tuple[str, str], ...]
    """Directories a ``mkdir`` change made, as (parent, name), in creation order."""
    idempotency: dict[str, Any] | None = None
    """A keyed call's receipt and result (see ``idempotency.Receipt.as_record``)."""
    history: dict[str, Any] | None = None
    """The set's history entry and where its kept content is (see ``history_entry``), so
    the recovery that rolls the set forward records it if the set could not."""
    database: dict[str, Any] | None = None
    """A ``prepared`` set's database (``name``, ``path``), where its marker decides."""

    @property
    def committed(self) -> bool:
        return self.state == "committed"

    def member_dirs(self) -> list[str]:
        """The directories that hold the set's staged files, backups and claims."""
        return list(dict.fromkeys(op.dir for op in self.ops))

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "version": RECORD_VERSION,
            "txid": self.txid,
            "state": self.state,
            "pid": self.pid,
            "created": self.created,
            "durability": self.durability,
            "ops": [op.to_json() for op in self.ops],
            "created_dirs": [list(made) for made in self.created_dirs],
        }
        if self.idempotency is not None:
            body["idempotency"] = self.idempotency
        if self.history is not None:
            body["history"] = self.history
        if self.database is not None:
            body["database"] = self.database
        return body

    def encode(self) -> bytes:
        return encode_body(self.to_json())


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def encode_body(body: dict[str, Any]) -> bytes:
    """A body with its checksum (tests use it to forge records of their own)."""
    return json.dumps({**body, "checksum": _checksum(body)}, indent=1, sort_keys=True).encode()


def decode(data: bytes) -> JournalRecord:
    """The typed record, or ``UntrustedRecordError`` with the reason it cannot be trusted."""
    if not data.strip():
        raise UntrustedRecordError("it is empty")
    try:
        loaded = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise UntrustedRecordError("it is not valid JSON (torn or overwritten)") from None
    body = _object(loaded, "the record")
    checksum = body.pop("checksum", None)
    if checksum is None:
        raise UntrustedRecordError("it has no checksum")
    if checksum != _checksum(body):
        raise UntrustedRecordError("its checksum does not match its content (it was altered)")
    version = body.get("version")
    if version != RECORD_VERSION:
        raise UntrustedRecordError(
            f"it has version {version!r}; this atomictools reads version {RECORD_VERSION}"
        )
    state = _text(body, "state", "the record")
    if state not in _STATES:
        raise UntrustedRecordError(f"its state is {state!r}")
    ops_raw = body.get("ops")
    dirs_raw = body.get("created_dirs")
    if not isinstance(ops_raw, list) or not isinstance(dirs_raw, list):
        raise UntrustedRecordError("ops or created_dirs is missing or not a list")
    idempotency = body.get("idempotency")
    if idempotency is not None and not isinstance(idempotency, dict):
        raise UntrustedRecordError("idempotency is not an object")
    history = body.get("history")
    if history is not None and not isinstance(history, dict):
        raise UntrustedRecordError("history is not an object")
    database = body.get("database")
    if state == "prepared":
        fields = _object(database, "the record's database")
        _text(fields, "path", "the record's database")
        _text(fields, "name", "the record's database")
    elif database is not None:
        raise UntrustedRecordError(f"a {state} record names a database")
    return JournalRecord(
        txid=_text(body, "txid", "the record"),
        state=state,  # type: ignore[arg-type]  # checked against _STATES above
        pid=int(_number(body, "pid", int)),
        created=float(_number(body, "created", float)),
        durability=_text(body, "durability", "the record"),
        ops=tuple(OpRecord.from_json(op, f"ops[{i}]") for i, op in enumerate(ops_raw)),
        created_dirs=tuple(_pair(made, f"created_dirs[{i}]") for i, made in enumerate(dirs_raw)),
        idempotency=idempotency,
        history=history,
        database=database,
    )


def _object(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UntrustedRecordError(f"{where} is not a JSON object")
    return raw


def _text(fields: dict[str, Any], key: str, where: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not value:
        raise UntrustedRecordError(f"{where}.{key} is missing or not a string")
    return value


def _optional_text(fields: dict[str, Any], key: str, where: str) -> str | None:
    value = fields.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise UntrustedRecordError(f"{where}.{key} is not a string")
    return value


def _number(fields: dict[str, Any], key: str, kind: type[int] | type[float]) -> int | float:
    value = fields.get(key)
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise UntrustedRecordError(f"the record's {key} is missing or not a number")
    return value


def _pair(raw: Any, where: str) -> tuple[str, str]:
    if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(p, str) for p in raw)):
        raise UntrustedRecordError(f"{where} is not a [parent, name] pair")
    return raw[0], raw[1]
