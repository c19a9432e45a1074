"""What ARL's API answers, as typed values."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

#: A callback that receives output as the code writes it.
OutputCallback = Callable[[str], None]


@dataclass(frozen=True)
class ExecutionError:
    """An exception the code raised and did not catch."""

    type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Execution:
    """What one execution did. An exception in the code is `error`, never a raise."""

    stdout: str
    stderr: str
    #: The repr of the final expression, when there is one and it is not `None`.
    result: str | None
    error: ExecutionError | None
    duration_ms: float
    #: Some output (or the result) passed the session's cap and was cut.
    truncated: bool
    session_ended: bool
    end_reason: str | None
    #: The execution's effects were undone (deadline, trap, memory, ...); the session goes on.
    rolled_back: bool
    rollback_reason: str | None
    #: What it displayed, as Jupyter MIME bundles (`text/plain`, `text/html`, `image/png`...);
    #: the final expression's last, with `"is_main_result": True`.
    results: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> Execution:
        e = v.get("error")
        error = ExecutionError(e["type"], e["message"], e.get("traceback", "")) if e else None
        return cls(
            stdout=v.get("stdout", ""),
            stderr=v.get("stderr", ""),
            result=v.get("result"),
            error=error,
            duration_ms=float(v.get("duration_ms", 0.0)),
            truncated=bool(v.get("truncated", False)),
            session_ended=bool(v.get("session_ended", False)),
            end_reason=v.get("end_reason"),
            rolled_back=bool(v.get("rolled_back", False)),
            rollback_reason=v.get("rollback_reason"),
            results=list(v.get("results", [])),
        )

    @property
    def text(self) -> str:
        """What a REPL would print: stdout, then the result's repr."""
        return self.stdout + (self.result if self.result is not None else "")


@dataclass(frozen=True)
class FileInfo:
    """A file or folder of a session's workspace."""

    path: str
    kind: str
    size: int
    modified_at: str | None

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> FileInfo:
        return cls(v["path"], v["kind"], int(v.get("size", 0)), v.get("modified_at"))


@dataclass(frozen=True)
class SessionInfo:
    """A session as the manager lists it."""

    id: str
    runtime: str
    state: str
    created_at: str
    last_used_at: str
    executions: int
    memory_bytes: int
    limits: dict[str, Any]
    metadata: dict[str, str]
    #: What its code may reach (`allow`, budgets), has spent (`requests`, `bytes`), and its
    #: host `tools`.
    network: dict[str, Any]

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> SessionInfo:
        return cls(
            id=v["id"],
            runtime=v["runtime"],
            state=v.get("state", ""),
            created_at=v.get("created_at", ""),
            last_used_at=v.get("last_used_at", ""),
            executions=int(v.get("executions", 0)),
            memory_bytes=int(v.get("memory_bytes", 0)),
            limits=dict(v.get("limits", {})),
            metadata=dict(v.get("metadata", {})),
            network=dict(v.get("network", {})),
        )


@dataclass(frozen=True)
class Snapshot:
    """A stored snapshot of a session: restore it with `client.restore(snapshot.id)`."""

    id: str
    runtime: str
    created_at: str
    size_bytes: int
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> Snapshot:
        return cls(v["id"], v["runtime"], v.get("created_at", ""), int(v.get("size_bytes", 0)), v)


@dataclass(frozen=True)
class HistoryEntry:
    """One turn of a session's trajectory."""

    n: int
    code: str
    stdout: str
    stderr: str
    result: str | None
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> HistoryEntry:
        return cls(int(v["n"]), v["code"], v.get("stdout", ""), v.get("stderr", ""), v.get("result"), v)


def history_lines(body: str) -> list[HistoryEntry]:
    """A session's history (JSON Lines) as entries, oldest first."""
    return [HistoryEntry.from_json(json.loads(line)) for line in body.splitlines() if line.strip()]
