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

sbx = Sandbox.create()
assert sbx.run_code("1+1").text == "2"

# State carries from one run_code to the next.
sbx.run_code("x = 41")
assert sbx.run_code("x + 1").text == "42"

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

# The sandbox ends, and a second kill finds nothing.
sandbox_id = sbx.sandbox_id
assert sbx.kill() is True
assert Sandbox.kill(sandbox_id) is False
print("ok")
