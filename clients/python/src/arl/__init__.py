"""ARL's Python client: stateful WebAssembly sandboxes from Python.

    import arl

    with arl.Client("http://127.0.0.1:8080").create_session() as session:
        session.execute("x = 41")
        print(session.execute("x + 1").result)  # 42

`AsyncClient` has the same surface with every call awaited. Exceptions raised by the code a
session runs are `Execution.error`; refusals and transport failures raise `ARLError`s.
"""

from ._async import AsyncClient, AsyncFiles, AsyncSession
from ._errors import (
    ARLError,
    CapacityExhausted,
    FileNotFound,
    InvalidRequest,
    QuotaExceeded,
    SessionBusy,
    SessionEnded,
    SessionNotFound,
    SnapshotNotFound,
    TransportError,
    Unauthorized,
)
from ._models import Execution, ExecutionError, FileInfo, HistoryEntry, SessionInfo, Snapshot
from ._sync import Client, Files, Session

__all__ = [
    "ARLError",
    "AsyncClient",
    "AsyncFiles",
    "AsyncSession",
    "CapacityExhausted",
    "Client",
    "Execution",
    "ExecutionError",
    "FileInfo",
    "FileNotFound",
    "Files",
    "HistoryEntry",
    "InvalidRequest",
    "QuotaExceeded",
    "Session",
    "SessionBusy",
    "SessionEnded",
    "SessionInfo",
    "SessionNotFound",
    "Snapshot",
    "SnapshotNotFound",
    "TransportError",
    "Unauthorized",
]
