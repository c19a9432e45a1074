"""The RLM guide's REPL factory over ARL: `create_sidecar_repl_factory()` hands out sessions
that behave as a Python REPL does, printing stdout and then the value of the last expression.

    factory = create_sidecar_repl_factory("http://127.0.0.1:8080")
    sid = await factory.create_session()
    await factory.execute_in_session(sid, "x = 42")
    await factory.execute_in_session(sid, "x * 2")   # "84"
    await factory.destroy_session(sid)
"""

from __future__ import annotations

from ._async import AsyncClient, AsyncSession


class SidecarReplFactory:
    """Sessions by id, each an ARL session; output as a REPL prints it."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._sessions: dict[str, AsyncSession] = {}

    async def create_session(self) -> str:
        session = await self.client.create_session()
        self._sessions[session.id] = session
        return session.id

    async def execute_in_session(self, session_id: str, code: str) -> str:
        """What a REPL shows for `code`: its stdout, then the result's repr; an uncaught
        exception's traceback instead of the result."""
        session = self._sessions.get(session_id) or self.client.session(session_id)
        execution = await session.execute(code)
        if execution.error is not None:
            return execution.stdout + execution.stderr + execution.error.traceback
        return execution.text

    async def destroy_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None) or self.client.session(session_id)
        await session.delete()

    async def close(self) -> None:
        """Deletes the sessions still open and closes the connections."""
        for session_id in list(self._sessions):
            await self.destroy_session(session_id)
        await self.client.close()


def create_sidecar_repl_factory(
    base_url: str | None = None, token: str | None = None
) -> SidecarReplFactory:
    """A factory over the manager at `base_url` (default `ARL_URL`, then
    `http://127.0.0.1:8080`)."""
    return SidecarReplFactory(AsyncClient(base_url, token))
