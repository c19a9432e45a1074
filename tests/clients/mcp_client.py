"""Drives ARL's MCP endpoint with the official MCP Python SDK (PyPI `mcp`) over the streamable
HTTP transport, as an agent framework would. Usage: mcp_client.py MCP_URL [TOKEN]. Prints `ok`
when every check held."""

import asyncio
import json
import sys

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def text(result):
    return "".join(c.text for c in result.content if c.type == "text")


async def main(url, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as s:
                await s.initialize()
                names = sorted(t.name for t in (await s.list_tools()).tools)
                assert names == [
                    "create_session", "delete_session", "execute", "list_files",
                    "read_file", "write_file",
                ], names

                created = await s.call_tool("create_session", {})
                assert not created.is_error, created
                sid = json.loads(text(created))["session_id"]

                # State carries from one execute to the next.
                first = await s.call_tool("execute", {"code": "x = 42", "session_id": sid})
                assert not first.is_error, first
                second = await s.call_tool("execute", {"code": "print('hi')\nx * 2", "session_id": sid})
                out = json.loads(text(second))
                assert out["result"] == "84" and out["stdout"] == "hi\n", out

                # A figure comes back as image content.
                fig = await s.call_tool("execute", {
                    "code": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
                    "session_id": sid,
                })
                images = [c for c in fig.content if c.type == "image"]
                assert images and images[0].mime_type == "image/png", fig.content

                # An exception is the tool's error result, with its traceback.
                failed = await s.call_tool("execute", {"code": "1/0", "session_id": sid})
                assert failed.is_error and "ZeroDivisionError" in text(failed), failed

                # Without a session: a fresh one for this call alone.
                once = await s.call_tool("execute", {"code": "'x' in globals()"})
                assert json.loads(text(once))["result"] == "False", once

                # Files.
                wrote = await s.call_tool("write_file", {"session_id": sid, "path": "d/a.txt", "content": "hello"})
                assert not wrote.is_error, wrote
                listed = json.loads(text(await s.call_tool("list_files", {"session_id": sid, "path": "d"})))
                assert [e["path"] for e in listed] == ["d/a.txt"], listed
                read_back = await s.call_tool("read_file", {"session_id": sid, "path": "d/a.txt"})
                assert text(read_back) == "hello", read_back
                seen = await s.call_tool("execute", {"code": "open('d/a.txt').read()", "session_id": sid})
                assert json.loads(text(seen))["result"] == "'hello'", seen

                # Bad input: tool errors the model can read, or protocol errors; never a crash.
                escape = await s.call_tool("read_file", {"session_id": sid, "path": "../../etc/passwd"})
                assert escape.is_error and "`..`" in text(escape), escape
                unknown = await s.call_tool("execute", {"code": "1", "session_id": "nope"})
                assert unknown.is_error and "nope" in text(unknown), unknown
                for name, args in [("execute", {}), ("execute", {"code": 5}), ("nope", {})]:
                    try:
                        bad = await s.call_tool(name, args)
                        assert bad.is_error, (name, args, bad)
                    except MCPError:
                        pass

                gone = await s.call_tool("delete_session", {"session_id": sid})
                assert not gone.is_error, gone
                after = await s.call_tool("execute", {"code": "x", "session_id": sid})
                assert after.is_error, after
    print("ok")


asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
