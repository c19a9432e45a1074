"""The errors the client raises: one class per error code ARL's API answers with, all `ARLError`.

An exception raised by the *code* a session runs is never one of these: it is the
`Execution.error` of that execution.
"""

from __future__ import annotations

from typing import Any

import httpx


class ARLError(Exception):
    """A request ARL refused or could not be made. `code` is the API's error code
    (`session_not_found`, `capacity_exhausted`, ...; `transport` when no answer came),
    `status` the HTTP status (0 without an answer) and `url` the request's URL."""

    def __init__(self, message: str, *, code: str, status: int, url: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.url = url

    def __str__(self) -> str:
        where = f"{self.status} from {self.url}" if self.status else self.url
        return f"{self.message} ({self.code}, {where})"


class TransportError(ARLError):
    """No answer: the manager is not reachable at that URL, or the connection broke."""


class Unauthorized(ARLError):
    """The token is missing or wrong (`unauthorized`)."""


class InvalidRequest(ARLError):
    """The request was malformed or out of bounds (`invalid_request`, `invalid_json`,
    `invalid_path`, `unknown_runtime`, ...)."""


class SessionNotFound(ARLError):
    """No session has that id (`session_not_found`)."""


class SessionEnded(ARLError):
    """The session has ended (`session_ended`); `reason` says why (`idle`, `deleted`, ...)."""

    def __init__(self, message: str, *, code: str, status: int, url: str, reason: str | None) -> None:
        super().__init__(message, code=code, status=status, url=url)
        self.reason = reason


class SessionBusy(ARLError):
    """Too many executions are already waiting on the session (`session_busy`)."""


class FileNotFound(ARLError):
    """Nothing at that path in the workspace (`file_not_found`)."""


class QuotaExceeded(ARLError):
    """The session's disk quota would be passed (`quota_exceeded`)."""


class SnapshotNotFound(ARLError):
    """No snapshot has that id (`snapshot_not_found`)."""


class CapacityExhausted(ARLError):
    """The manager is full, draining or not ready (429/503); `retry_after` is the seconds it
    suggests waiting, when it said."""

    def __init__(
        self, message: str, *, code: str, status: int, url: str, retry_after: float | None
    ) -> None:
        super().__init__(message, code=code, status=status, url=url)
        self.retry_after = retry_after


_BY_CODE: dict[str, type[ARLError]] = {
    "unauthorized": Unauthorized,
    "session_not_found": SessionNotFound,
    "session_busy": SessionBusy,
    "file_not_found": FileNotFound,
    "quota_exceeded": QuotaExceeded,
    "snapshot_not_found": SnapshotNotFound,
}


def error_from(response: httpx.Response) -> ARLError:
    """The `ARLError` a non-2xx answer stands for."""
    url = str(response.request.url)
    status = response.status_code
    code, message, reason = f"http_{status}", response.reason_phrase or "error", None
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        code = str(detail.get("code", code))
        message = str(detail.get("message", message))
        reason = detail.get("reason")
    elif response.text:
        message = response.text[:500]
    if code == "session_ended":
        return SessionEnded(message, code=code, status=status, url=url, reason=reason)
    if status in (429, 503):
        after = response.headers.get("retry-after")
        retry_after = float(after) if after and after.replace(".", "", 1).isdigit() else None
        return CapacityExhausted(message, code=code, status=status, url=url, retry_after=retry_after)
    if status == 401:
        return Unauthorized(message, code=code, status=status, url=url)
    kind = _BY_CODE.get(code)
    if kind is None:
        kind = InvalidRequest if 400 <= status < 500 else ARLError
    return kind(message, code=code, status=status, url=url)


def transport_error(e: httpx.TransportError, url: str) -> TransportError:
    """A failure to reach the manager, naming where it was looked for."""
    return TransportError(
        f"could not reach ARL: {type(e).__name__}: {e}", code="transport", status=0, url=url
    )
