"""atomictools: atomic, cancellation-safe and crash-safe file changes for AI agents.

The embedding API in one import::

    from atomictools import Workspace

    ws = Workspace(["/srv/project"])
    result = await ws.write("notes.txt", "hello\\n")
    await ws.edit("notes.txt", [("hello", "hello, world")], expected_sha256=result.sha256)
"""

from .config import Durability, Limits
from .edits import Edit
from .errors import (
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
from .journal import Change, ChangeOutcome, ChangeSetResult, RecoveryNeededError
from .recovery import recover
from .recovery_report import RecoveryReport, UnfinishedSet
from .results import (
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
from .workspace import ChangeSet, Workspace, atomic_write, atomic_writer
from .writer import AtomicWriter

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
