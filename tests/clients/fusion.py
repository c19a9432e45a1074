"""Drives ARL's /run_code with the real PyPI `sandbox-fusion` client, unmodified, and a raw
request shaped as verl sends it. Usage: fusion.py BASE_URL. Prints `ok` when every check held."""

import base64
import sys

import requests
from sandbox_fusion import (
    RunCodeRequest,
    RunJupyterRequest,
    RunStatus,
    run_code,
    run_jupyter,
    set_endpoint,
)

base = sys.argv[1]
set_endpoint(base)


def b64(text):
    return base64.b64encode(text.encode()).decode()


def run(**fields):
    # One attempt: a retried SandboxError would hide what the first answer was.
    return run_code(RunCodeRequest(language="python", **fields), max_attempts=1)


# A script: stdin, argv, __name__, output.
r = run(code="s = input()\nprint(s[::-1])\nimport sys\nprint(sys.argv, __name__)", stdin="olleh\n")
assert r.status == RunStatus.Success, r
assert r.run_result.status == "Finished" and r.run_result.return_code == 0, r
assert r.run_result.stdout == "hello\n['main.py'] __main__\n", r
assert r.run_result.stderr == "", r
assert r.compile_result is None and r.run_result.execution_time > 0, r

# Files in (base64, relative to the working folder), files back, a missing one left out.
r = run(
    code="data = open('in/data.txt').read()\nopen('out.txt', 'w').write(data.upper())",
    files={"in/data.txt": b64("abc")},
    fetch_files=["out.txt", "missing.txt"],
)
assert r.status == RunStatus.Success, r
assert r.files == {"out.txt": b64("ABC")}, r

# Exit statuses as a process has them.
r = run(code="import sys\nprint('before')\nsys.exit(3)")
assert r.status == RunStatus.Failed and r.run_result.return_code == 3, r
assert r.run_result.stdout == "before\n", r
r = run(code="import sys; sys.exit(0)")
assert r.status == RunStatus.Success and r.run_result.return_code == 0, r
r = run(code="def f():\n    raise ValueError('boom')\nf()")
assert r.status == RunStatus.Failed and r.run_result.return_code == 1, r
err = r.run_result.stderr
assert err.startswith("Traceback (most recent call last):"), err
assert 'File "main.py", line 3, in <module>' in err and err.endswith("ValueError: boom\n"), err

# The deadline.
r = run(code="while True: pass", run_timeout=1)
assert r.status == RunStatus.Failed, r
assert r.run_result.status == "TimeLimitExceeded" and r.run_result.return_code is None, r

# JavaScript and TypeScript programs, as node runs them: stdin, argv, exit statuses, stacks.
def run_in(language, **fields):
    return run_code(RunCodeRequest(language=language, **fields), max_attempts=1)


r = run_in("nodejs", code="const s = require('fs').readFileSync(0, 'utf8').trim();\nconsole.log(s.split('').reverse().join(''), process.argv.slice(1))", stdin="olleh\n")
assert r.status == RunStatus.Success and r.run_result.return_code == 0, r
assert r.run_result.stdout == "hello [ 'main.js' ]\n", r
r = run_in("nodejs", code="console.log('before'); process.exit(3)")
assert r.status == RunStatus.Failed and r.run_result.return_code == 3 and r.run_result.stdout == "before\n", r
r = run_in("nodejs", code="process.exitCode = 2")
assert r.run_result.return_code == 2, r
r = run_in("nodejs", code="function f() { throw new Error('boom') }\nf()")
assert r.status == RunStatus.Failed and r.run_result.return_code == 1, r
assert r.run_result.stderr.startswith("Error: boom\n    at f"), r
r = run_in("nodejs", code="while (true) {}", run_timeout=1)
assert r.run_result.status == "TimeLimitExceeded", r
r = run_in("typescript", code="const greet = (n: string): string => `hi ${n}`;\nconsole.log(greet('ts'))")
assert r.status == RunStatus.Success and r.run_result.stdout == "hi ts\n", r
r = run_in("nodejs", code="require('fs').writeFileSync('out.txt', require('fs').readFileSync('in.txt', 'utf8') + '!')", files={"in.txt": b64("js")}, fetch_files=["out.txt"])
assert r.status == RunStatus.Success and r.files == {"out.txt": b64("js!")}, r

# A language ARL does not run: Failed, naming what it runs (a SandboxError would be retried).
r = run_code(RunCodeRequest(language="go", code="package main"), max_attempts=1)
assert r.status == RunStatus.Failed and "python" in r.message and "nodejs" in r.message, r

# Bad input answers Failed with a reason, and nothing outside the workspace is touched.
r = run(code="print(1)", files={"../escape.txt": b64("x")})
assert r.status == RunStatus.Failed and "escape.txt" in r.message, r
r = run(code="print(1)", files={"in.txt": "not base64!"})
assert r.status == RunStatus.Failed and "base64" in r.message, r
r = run(code="print(1)", fetch_files=["/etc/passwd"])
assert r.status == RunStatus.Failed and "/etc/passwd" in r.message, r

# verl's own request: the full URL, every field, stdin "None" (str(None)), a memory limit.
body = {
    "compile_timeout": 10, "run_timeout": 10, "code": "print(input())", "stdin": "None",
    "memory_limit_MB": 1024, "language": "python", "files": {}, "fetch_files": [],
}
headers = {"Content-Type": "application/json", "Accept": "application/json"}
v = requests.post(f"{base}/run_code", json=body, headers=headers, timeout=30).json()
assert v["status"] == "Success" and v["run_result"]["stdout"] == "None\n", v
assert isinstance(v["run_result"]["stderr"], str), v
assert requests.get(f"{base}/v1/ping", timeout=5).json() == "pong"

# Notebook cells in one interpreter: state kept, values displayed, errors per cell.
cells = [
    "a = 123",
    "a",
    "print(a)",
    "import sys; sys.stderr.write('to stderr')",
    "raise RuntimeError('error message')",
]
r = run_jupyter(RunJupyterRequest(cells=cells), max_attempts=1)
assert r.status == RunStatus.Failed, r  # the last cell raised
assert len(r.cells) == 5, r
assert r.cells[1].display == [{"text/plain": "123"}], r.cells[1]
assert r.cells[2].stdout == "123\n" and r.cells[2].error == [], r.cells[2]
assert r.cells[3].stderr == "to stderr", r.cells[3]
error = r.cells[4].error[0]
assert error["ename"] == "RuntimeError" and error["evalue"] == "error message", error
assert error["traceback"][0].startswith("Traceback"), error
r = run_jupyter(RunJupyterRequest(cells=["x = 1", "x + 1"], files={"d.txt": b64("hi")}, fetch_files=["d.txt"]), max_attempts=1)
assert r.status == RunStatus.Success and r.cells[1].display == [{"text/plain": "2"}], r
assert r.files == {"d.txt": b64("hi")}, r
r = run_jupyter(RunJupyterRequest(cells=["import time; time.sleep(60)", "1"], total_timeout=1), max_attempts=1)
assert r.status == RunStatus.Failed and r.driver.status == "TimeLimitExceeded", r
assert len(r.cells) == 1, r
print("ok")
