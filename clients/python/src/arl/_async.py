"""The asyncio client: `AsyncClient`, `AsyncSession` and a session's `AsyncFiles`, the same
surface as the blocking one with every call awaited."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import httpx

from . import _core
from ._errors import ARLError, CapacityExhausted, transport_error
from ._models import (
    Execution,
    FileInfo,
    HistoryEntry,
    OutputCallback,
    SessionInfo,
    Snapshot,
    history_lines,
)


class AsyncClient:
    """A connection pool to one ARL manager (or gateway), for asyncio.

    `base_url` and `token` default to `ARL_URL` and `ARL_AUTH_TOKEN`. Creates answered 429 or
    503 are retried `create_retries` times with exponential back-off (or the server's
    Retry-After). `transport` replaces httpx's own (a proxy's, or a test's)."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        create_retries: int = 5,
        backoff: float = 0.05,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.options = _core.Options.resolve(base_url, token, timeout, create_retries, backoff)
        self._http = httpx.AsyncClient(
            base_url=self.options.base_url,
            headers=self.options.headers(),
            timeout=timeout,
            limits=self.options.limits(),
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.options.base_url + path
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise transport_error(e, url) from e
        return _core.checked(response)

    async def create_session(
        self,
        *,
        runtime: str | None = None,
        timeout_ms: int | None = None,
        memory_mib: int | None = None,
        env: dict[str, str] | None = None,
        idle_ttl_secs: int | None = None,
        lifetime_secs: int | None = None,
        rollback: bool | None = None,
        metadata: dict[str, str] | None = None,
        network: dict[str, Any] | None = None,
        tools: dict[str, dict[str, Any]] | None = None,
    ) -> AsyncSession:
        """A new session with these limits (the manager's defaults for those not given).

        `network` (`{"allow": ["api.github.com", "127.0.0.1:9000"], "max_bytes"?,
        "max_requests"?}`) is what its code may reach over brokered HTTP; `tools`
        (`{"llm_query": {"url": ..., "headers"?: {...}}}`) the caller's endpoints it may call.
        """
        body = _core.create_body(
            dict(
                runtime=runtime,
                timeout_ms=timeout_ms,
                memory_mib=memory_mib,
                env=env,
                idle_ttl_secs=idle_ttl_secs,
                lifetime_secs=lifetime_secs,
                rollback=rollback,
                metadata=metadata,
                network=network,
                tools=tools,
            )
        )
        return await self._create(body)

    async def restore(self, snapshot_id: str, **limits: Any) -> AsyncSession:
        """A new session from a stored snapshot's state and files."""
        return await self._create(_core.create_body(dict(limits, from_snapshot=snapshot_id)))

    async def _create(self, body: dict[str, Any]) -> AsyncSession:
        delays = self.options.delays()
        while True:
            try:
                created = (await self._request("POST", "/v1/sessions", json=body)).json()
                return AsyncSession(self, created["id"], created.get("runtime", "python"))
            except CapacityExhausted as e:
                planned = next(delays, None)
                if planned is None:
                    raise
                await asyncio.sleep(_core.retry_wait(e, planned))

    def session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (nothing is asked of the manager)."""
        return AsyncSession(self, session_id, "")

    async def sessions(self) -> list[SessionInfo]:
        """The manager's live sessions."""
        listed = (await self._request("GET", "/v1/sessions")).json()
        return [SessionInfo.from_json(s) for s in listed.get("sessions", [])]

    async def load(self) -> dict[str, Any]:
        """The manager's load: `sessions`, `capacity`, `memory_bytes`, `draining`."""
        load: dict[str, Any] = (await self._request("GET", "/v1/load")).json()
        return load


class AsyncSession:
    """One session: an interpreter whose state lasts across executions. As a context
    manager, it is deleted on exit."""

    def __init__(self, client: AsyncClient, session_id: str, runtime: str) -> None:
        self.client = client
        self.id = session_id
        self.runtime = runtime
        self.files = AsyncFiles(self)

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.delete()
        except ARLError:
            if exc is None:
                raise

    async def execute(
        self,
        code: str,
        timeout_ms: int | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> Execution:
        """Runs `code` as the session's next cell. With a callback, output streams to it (over
        Server-Sent Events) as the code writes it. An exception in the code is `error`."""
        body: dict[str, Any] = _core.create_body(dict(code=code, timeout_ms=timeout_ms))
        path = _core.session_path(self.id, "execute")
        timeout = _core.execute_timeout(self.client.options, timeout_ms)
        if on_stdout is None and on_stderr is None:
            answer = (await self.client._request("POST", path, json=body, timeout=timeout)).json()
            return Execution.from_json(answer)
        url = self.client.options.base_url + path
        reader = _core.EventReader(url, on_stdout, on_stderr)
        headers = {"Accept": "text/event-stream"}
        try:
            async with self.client._http.stream(
                "POST", path, json=body, headers=headers, timeout=timeout
            ) as response:
                if not response.is_success:
                    await response.aread()
                    _core.checked(response)
                async for line in response.aiter_lines():
                    reader.line(line)
        except httpx.TransportError as e:
            raise transport_error(e, url) from e
        return reader.finish()

    async def info(self) -> SessionInfo:
        return SessionInfo.from_json(
            (await self.client._request("GET", _core.session_path(self.id))).json()
        )

    async def fork(self) -> AsyncSession:
        """A new session with this one's interpreter state and files."""
        created = (await self.client._request("POST", _core.session_path(self.id, "fork"))).json()
        return AsyncSession(self.client, created["id"], created.get("runtime", self.runtime))

    async def snapshot(self) -> Snapshot:
        """Stores this session's state and files; restore with `client.restore(id)`."""
        stored = (await self.client._request("POST", _core.session_path(self.id, "snapshot"))).json()
        return Snapshot.from_json(stored)

    async def history(self) -> list[HistoryEntry]:
        """The session's turns, oldest first."""
        body = (await self.client._request("GET", _core.session_path(self.id, "history"))).text
        return history_lines(body)

    async def delete(self) -> None:
        await self.client._request("DELETE", _core.session_path(self.id))


class AsyncFiles:
    """The files of a session's `/workspace`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def write(self, path: str, data: str | bytes) -> FileInfo:
        """Writes `data` to `path` (folders made as needed), whole or not at all."""
        raw = data.encode() if isinstance(data, str) else data
        path_ = _core.file_path(self._session.id, path)
        written = await self._session.client._request("PUT", path_, content=raw)
        return FileInfo.from_json(written.json())

    async def read(self, path: str) -> bytes:
        path_ = _core.file_path(self._session.id, path)
        return (await self._session.client._request("GET", path_)).content

    async def read_text(self, path: str) -> str:
        return (await self.read(path)).decode()

    async def list(self, path: str = "") -> list[FileInfo]:
        """The entries of a folder (the workspace itself by default), by name."""
        params = {"path": path} if path else None
        listed = (
            await self._session.client._request(
                "GET", _core.session_path(self._session.id, "files"), params=params
            )
        ).json()
        return [FileInfo.from_json(e) for e in listed.get("entries", [])]

    async def delete(self, path: str) -> None:
        """Removes a file, or a folder with everything in it."""
        await self._session.client._request("DELETE", _core.file_path(self._session.id, path))
