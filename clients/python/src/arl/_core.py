"""What the sync and async clients share: configuration, the request each call makes, and
how answers (JSON, Server-Sent Events) are read. Only the I/O differs between the two."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import quote

import httpx

from ._errors import ARLError, CapacityExhausted, error_from
from ._models import Execution, OutputCallback

DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class Options:
    """How a client reaches ARL and how patiently it creates sessions."""

    base_url: str
    token: str | None
    #: Seconds a request (other than an execute, which gets its deadline and a margin) may take.
    timeout: float
    #: Retries of a create answered 429/503 (the manager full, draining or not ready yet).
    create_retries: int
    #: First back-off in seconds; doubled each retry, with jitter, or the server's Retry-After.
    backoff: float

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        token: str | None,
        timeout: float,
        create_retries: int,
        backoff: float,
    ) -> Options:
        url = base_url or os.environ.get("ARL_URL") or DEFAULT_URL
        return cls(
            base_url=url.rstrip("/"),
            token=token if token is not None else os.environ.get("ARL_AUTH_TOKEN") or None,
            timeout=timeout,
            create_retries=max(0, create_retries),
            backoff=max(0.0, backoff),
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def limits(self) -> httpx.Limits:
        # Keep-alive connections are reused across calls (one per concurrent request).
        return httpx.Limits(max_keepalive_connections=32, keepalive_expiry=30.0)

    def delays(self) -> Iterator[float]:
        """The waits before each retry of a create."""
        for attempt in range(self.create_retries):
            yield self.backoff * (2**attempt) * (0.5 + random.random())


def retry_wait(error: ARLError, planned: float) -> float:
    """How long to wait before retrying after `error`: the server's word, if it gave one."""
    if isinstance(error, CapacityExhausted) and error.retry_after is not None:
        return min(error.retry_after, 30.0)
    return planned


def session_path(session_id: str, *rest: str) -> str:
    return "/".join(["/v1/sessions", quote(session_id, safe=""), *rest])


def file_path(session_id: str, path: str) -> str:
    """The URL path of a workspace file. `.` and `..` segments are sent encoded, so that the
    manager (not the URL parser) sees them, and refuses them."""
    segments = [
        quote(part, safe="") if part not in (".", "..") else part.replace(".", "%2E")
        for part in path.lstrip("/").split("/")
    ]
    return session_path(session_id, "files", *segments)


def create_body(limits: dict[str, Any]) -> dict[str, Any]:
    """A create's JSON: the limits given, `None`s left out."""
    return {k: v for k, v in limits.items() if v is not None}


def execute_timeout(options: Options, timeout_ms: int | None) -> httpx.Timeout:
    """An execute waits its deadline (the session's, at most ten minutes, when not given)."""
    read = (timeout_ms / 1000 if timeout_ms else 600.0) + 30.0
    return httpx.Timeout(options.timeout, read=read)


def checked(response: httpx.Response) -> httpx.Response:
    """`response` if it is 2xx; its `ARLError` otherwise (the body must have been read)."""
    if response.is_success:
        return response
    raise error_from(response)


def json_of(response: httpx.Response) -> Any:
    return checked(response).json()


class EventReader:
    """Reads a streamed execute's Server-Sent Events a line at a time: `stdout`/`stderr`
    events go to the callbacks as they come, the `result` event is the execution, an `error`
    event raises."""

    def __init__(
        self, url: str, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
    ) -> None:
        self.url = url
        self.callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self.event = "message"
        self.data: list[str] = []
        self.execution: Execution | None = None

    def line(self, line: str) -> None:
        if line == "":
            self._dispatch()
        elif line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))

    def _dispatch(self) -> None:
        event, data = self.event, "\n".join(self.data)
        self.event, self.data = "message", []
        if not data:
            return
        value = json.loads(data)
        callback = self.callbacks.get(event)
        if event in self.callbacks:
            if callback is not None:
                callback(value.get("text", ""))
        elif event == "result":
            self.execution = Execution.from_json(value)
        elif event == "error":
            detail = value.get("error", {})
            raise ARLError(
                str(detail.get("message", "the execution failed")),
                code=str(detail.get("code", "error")),
                status=200,
                url=self.url,
            )

    def finish(self) -> Execution:
        self._dispatch()
        if self.execution is None:
            raise ARLError(
                "the stream ended before the execution's result",
                code="stream_cut",
                status=200,
                url=self.url,
            )
        return self.execution
