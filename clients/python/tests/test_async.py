"""The asyncio client, and the RLM guide's factory, against a real manager."""

import asyncio

import pytest

import arl
from arl.rlm import create_sidecar_repl_factory


def test_the_async_client(url: str, token: str | None) -> None:
    async def main() -> None:
        async with arl.AsyncClient(url, token) as client:
            async with await client.create_session() as session:
                assert (await session.execute("1+1")).result == "2"
                await session.execute("x = 41")
                chunks: list[str] = []
                ex = await session.execute("print('hi')\nx + 1", on_stdout=chunks.append)
                assert chunks == ["hi\n"] and ex.result == "42"
                await session.files.write("a.txt", "async")
                assert await session.files.read_text("a.txt") == "async"
                fork = await session.fork()
                assert (await fork.execute("x")).result == "41"
                await fork.delete()
                # Sessions in parallel, over one pool of connections.
                others = await asyncio.gather(*(client.create_session() for _ in range(3)))
                results = await asyncio.gather(*(s.execute(f"{i} * 2") for i, s in enumerate(others)))
                assert [r.result for r in results] == ["0", "2", "4"]
                await asyncio.gather(*(s.delete() for s in others))
            with pytest.raises(arl.SessionNotFound):
                await client.session("nope").execute("1")

    asyncio.run(main())


def test_the_rlm_factory_prints_as_a_repl(url: str, token: str | None) -> None:
    async def main() -> None:
        factory = create_sidecar_repl_factory(url, token)
        sid = await factory.create_session()
        assert await factory.execute_in_session(sid, "x = 42") == ""
        assert await factory.execute_in_session(sid, "x * 2") == "84"
        assert await factory.execute_in_session(sid, "print('a')\nx") == "a\n42"
        assert "ZeroDivisionError" in await factory.execute_in_session(sid, "1/0")
        await factory.destroy_session(sid)
        await factory.close()

    asyncio.run(main())
