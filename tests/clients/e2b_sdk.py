"""Drives ARL with the real PyPI `e2b-code-interpreter` SDK, unmodified, configured only by
environment variables as its users do (this file is not named e2b.py, which would shadow
the package). Usage: e2b_sdk.py BASE_URL [API_KEY]. Prints `ok` when
every check held."""

import base64
import os
import sys

base = sys.argv[1]
os.environ["E2B_API_KEY"] = sys.argv[2] if len(sys.argv) > 2 else "x"
os.environ["E2B_API_URL"] = base
os.environ["E2B_SANDBOX_URL"] = base

from e2b_code_interpreter import Sandbox  # noqa: E402  (reads the environment above)

import datetime  # noqa: E402

from e2b import FileType, SandboxQuery  # noqa: E402

tag = os.urandom(4).hex()
sbx = Sandbox.create(metadata={"run": tag}, timeout=120)
assert sbx.run_code("1+1").text == "2"

# The control plane: info, listing by metadata, timeout, connect.
info = sbx.get_info()
assert info.sandbox_id == sbx.sandbox_id and info.metadata == {"run": tag}, info
assert info.template_id == "code-interpreter-v1", info
life = (info.end_at - info.started_at).total_seconds()
assert 119 <= life <= 121, life
sbx.set_timeout(3600)
later = sbx.get_info().end_at
assert later - info.end_at > datetime.timedelta(minutes=50), (later, info.end_at)
other = Sandbox.create(metadata={"run": tag, "role": "other"})
listed = Sandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items()
assert sorted(s.sandbox_id for s in listed) == sorted([sbx.sandbox_id, other.sandbox_id]), listed
listed = Sandbox.list(query=SandboxQuery(metadata={"role": "other"})).next_items()
assert [s.sandbox_id for s in listed] == [other.sandbox_id], listed
pages = Sandbox.list(query=SandboxQuery(metadata={"run": tag}), limit=1)
first, second = pages.next_items(), pages.next_items()
assert len(first) == 1 and len(second) == 1 and first[0].sandbox_id != second[0].sandbox_id
assert not pages.has_next
assert other.is_running()
other.kill()
assert not other.is_running()

# State carries from one run_code to the next.
sbx.run_code("x = 41")
assert sbx.run_code("x + 1").text == "42"

# Fork: new sandboxes with this one's state and files; the original goes on unchanged.
# (Before any figure: matplotlib keeps font files open, and open files cannot be forked.)
sbx.files.write("seed.txt", "seed")
forks = sbx.fork(count=2)
assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks), forks
for f in forks:
    assert f.sandbox_id != sbx.sandbox_id
    assert f.run_code("x + 1").text == "42"
    assert f.files.read("seed.txt") == "seed"
forks[0].run_code("x = 0")
assert forks[1].run_code("x").text == "41" and sbx.run_code("x").text == "41"
assert forks[0].get_info().metadata == {"run": tag}
for f in forks:
    f.kill()

# JavaScript and TypeScript: run_code(language=...) runs in the sandbox's JavaScript kernel,
# whose globals persist like Python's; contexts in either language.
assert sbx.run_code("let y = 41", language="js").text is None
assert sbx.run_code("y + 1", language="js").text == "42"
js_lines = []
ex = sbx.run_code("console.log('from js'); ({ a: [1, 2] })", language="js", on_stdout=lambda m: js_lines.append(m.line))
assert js_lines == ["from js\n"] and ex.text == "{ a: [ 1, 2 ] }", (js_lines, ex)
ex = sbx.run_code("null.f()", language="js")
assert ex.error and ex.error.name == "TypeError", ex.error
assert sbx.run_code("const n: number = 21; n * 2", language="ts").text == "42"
js_ctx = sbx.create_code_context(language="js")
assert js_ctx.language == "js", js_ctx
sbx.run_code("var y = 'in a js context'", context=js_ctx)
assert sbx.run_code("y", context=js_ctx).text == "'in a js context'"
assert sbx.run_code("y", language="js").text == "41", "the js kernel's own globals are apart"
assert sbx.run_code("x").text == "41", "python's x is untouched"
sbx.remove_code_context(js_ctx)

# Output, as it is printed, with timestamps.
lines = []
ex = sbx.run_code("print('hi')\nprint('there')", on_stdout=lambda m: lines.append(m.line))
assert ex.logs.stdout == ["hi\n", "there\n"], ex.logs
assert lines == ["hi\n", "there\n"], lines
assert ex.execution_count is not None and ex.execution_count >= 4, ex.execution_count

# A DataFrame's HTML and a figure's PNG.
ex = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
assert ex.results[0].is_main_result and "<table" in ex.results[0].html, ex.results
ex = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
assert base64.b64decode(ex.results[0].png).startswith(b"\x89PNG"), ex.results

# An exception is the execution's error, not a raise.
ex = sbx.run_code("1/0")
assert ex.error.name == "ZeroDivisionError" and ex.error.value == "division by zero", ex.error
assert "Traceback" in ex.error.traceback, ex.error

# Files: E2B's home is the session's workspace, where code runs.
info = sbx.files.write("/home/user/data.txt", "hello")
assert info.path == "/home/user/data.txt" and info.name == "data.txt", info
assert sbx.run_code("open('data.txt').read()").text == "'hello'"
sbx.run_code("open('out/r.bin', 'wb').write(bytes(range(5))) if __import__('os').makedirs('out', exist_ok=True) is None else 0")
assert sbx.files.read("/home/user/out/r.bin", format="bytes") == bytes(range(5))
assert sbx.files.read("data.txt") == "hello"
from e2b import FileNotFoundException, InvalidArgumentException, SandboxException  # noqa: E402

try:
    sbx.files.read("/home/user/missing.txt")
    raise AssertionError("a missing file was read")
except FileNotFoundException:
    pass
try:
    sbx.files.write("/etc/passwd", "x")
    raise AssertionError("a file outside the sandbox was written")
except (InvalidArgumentException, SandboxException):
    pass

# No processes in a WebAssembly sandbox: commands raise, saying so.
try:
    sbx.commands.run("ls")
    raise AssertionError("a command ran")
except SandboxException as e:
    assert "run no processes" in str(e), e

# Contexts: each its own variables, in its own folder; restart forgets them.
sbx.files.make_dir("/home/user/proj")
ctx = sbx.create_code_context(cwd="/home/user/proj")
assert ctx.cwd == "/home/user/proj" and ctx.language == "python", ctx
sbx.run_code("x = 'in ctx'", context=ctx)
assert sbx.run_code("x", context=ctx).text == "'in ctx'"
assert sbx.run_code("x + 1").text == "42"  # the default context's x is untouched
assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "'/workspace/proj'"
assert [c.id for c in sbx.list_code_contexts()] == ["default", ctx.id]
sbx.restart_code_context(ctx)
ex = sbx.run_code("x", context=ctx)
assert ex.error and ex.error.name == "NameError", ex.error
sbx.remove_code_context(ctx)
assert [c.id for c in sbx.list_code_contexts()] == ["default"]

# The filesystem service: stat, list, make, move, remove.
assert sbx.files.exists("/home/user/data.txt") and not sbx.files.exists("nope.txt")
entry = sbx.files.get_info("/home/user/data.txt")
assert entry.type == FileType.FILE and entry.size == 5 and entry.name == "data.txt", entry
assert sbx.files.make_dir("/home/user/proj/deep/er") is True
assert sbx.files.make_dir("/home/user/proj") is False
names = sorted(e.path for e in sbx.files.list("/home/user/proj", depth=3))
assert names == ["/home/user/proj/deep", "/home/user/proj/deep/er"], names
moved = sbx.files.rename("/home/user/data.txt", "/home/user/proj/data.txt")
assert moved.path == "/home/user/proj/data.txt" and moved.type == FileType.FILE, moved
assert sbx.run_code("open('proj/data.txt').read()").text == "'hello'"
sbx.files.remove("/home/user/proj")
assert not sbx.files.exists("/home/user/proj/data.txt")
home = [e.name for e in sbx.files.list("/home/user")]
assert "proj" not in home and "out" in home, home

# Egress: `network.allow_out` is the sandbox's allow-list; without it, no network.
import http.server  # noqa: E402
import threading  # noqa: E402


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("content-length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
threading.Thread(target=server.serve_forever, daemon=True).start()
fetch = f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{server.server_address[1]}/').read()"
netted = Sandbox.create(network={"allow_out": [f"127.0.0.1:{server.server_address[1]}"]})
assert netted.run_code(fetch).text == "b'hello'"
refused = sbx.run_code(fetch).error
assert refused is not None and refused.name == "NetworkRefused", refused
netted.kill()
server.shutdown()

# Connect: the same sandbox, its state, from its id.
again = Sandbox.connect(sbx.sandbox_id)
assert again.run_code("x + 1").text == "42"

# The sandbox ends, and a second kill finds nothing.
sandbox_id = sbx.sandbox_id
assert sbx.kill() is True
assert Sandbox.kill(sandbox_id) is False
print("ok")
