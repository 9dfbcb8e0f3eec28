"""atomictools: atomic, cancellation-safe and crash-safe file changes for AI agents.

The embedding API in one import::

    from atomictools import Workspace

    ws = Workspace(["/srv/project"])
    result = await ws.write("notes.txt", "hello\\n")
    await ws.edit("notes.txt", [("hello", "hello, world")], expected_sha256=result.sha256)
"""

from atomictools.engine.changes.journaled import (
    Change,
    ChangeOutcome,
    ChangeSetResult,
    RecoveryNeededError,
)
from atomictools.engine.changes.recovery import recover
from atomictools.engine.changes.recovery_report import RecoveryReport, UnfinishedSet
from atomictools.engine.config import Durability, Limits
from atomictools.engine.durable.writer import AtomicWriter
from atomictools.engine.errors import (
    AlreadyExistsError,
    AtomicToolsError,
    ConcurrentChangeError,
    DiskFullError,
    DurabilityUnknownError,
    EditAmbiguousError,
    EditError,
    EditNotFoundError,
    FileSystemError,
    InvalidArgumentError,
    InvalidPathError,
    NotFoundError,
    OutsideRootsError,
    PermissionDeniedError,
    PreconditionFailedError,
    ReadOnlyError,
    StateDirError,
    TextEncodingError,
    TooLargeError,
    WrongTypeError,
)
from atomictools.engine.results import (
    BytesRead,
    CopyResult,
    DeleteResult,
    DirEntry,
    DirListing,
    EditResult,
    FileInfo,
    MkdirResult,
    MoveResult,
    SearchResult,
    TextRead,
    TreeNode,
    WriteResult,
)
from atomictools.engine.text.edits import Edit
from atomictools.engine.workspace import ChangeSet, Workspace, atomic_write, atomic_writer

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "AtomicToolsError",
    "AtomicWriter",
    "BytesRead",
    "Change",
    "ChangeOutcome",
    "ChangeSet",
    "ChangeSetResult",
    "ConcurrentChangeError",
    "CopyResult",
    "DeleteResult",
    "DirEntry",
    "DirListing",
    "DiskFullError",
    "Durability",
    "DurabilityUnknownError",
    "Edit",
    "EditAmbiguousError",
    "EditError",
    "EditNotFoundError",
    "EditResult",
    "FileInfo",
    "FileSystemError",
    "InvalidArgumentError",
    "InvalidPathError",
    "Limits",
    "MkdirResult",
    "MoveResult",
    "NotFoundError",
    "OutsideRootsError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "ReadOnlyError",
    "RecoveryNeededError",
    "RecoveryReport",
    "SearchResult",
    "StateDirError",
    "TextEncodingError",
    "TextRead",
    "TooLargeError",
    "TreeNode",
    "UnfinishedSet",
    "Workspace",
    "WriteResult",
    "WrongTypeError",
    "__version__",
    "atomic_write",
    "atomic_writer",
    "recover",
]
