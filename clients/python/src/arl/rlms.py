"""An `arl` environment for the `rlms` library (PyPI `rlms`, the recursive-language-model
REPL loop): the REPL code an RLM writes runs in an ARL session. Install with the `rlms` extra.

    import arl.rlms
    from rlm import RLM

    arl.rlms.register()  # teaches rlm.get_environment the name "arl"
    rlm = RLM(backend="openai", backend_kwargs={...}, environment="arl",
              environment_kwargs={"base_url": "http://127.0.0.1:8080"})

The REPL holds `context` (the prompt the RLM was given), `answer` (set `answer["content"]`
and `answer["ready"] = True` to finish, as with rlms' own environments) and `SHOW_VARS()`.
`llm_query(prompt, model=None)` and `llm_query_batched(prompts, model=None)` call back the
RLM's model: the environment serves them on a local HTTP endpoint (`callback_host`, 127.0.0.1
by default, on a free port) that it names as the session's host tools, and forwards each to
rlms' LM handler. The manager must reach that endpoint (a manager on the same machine, or
beside the caller in its pod, does). `rlm_query` falls back to `llm_query`, as rlms' local
REPL does without a sub-call function. Without an LM handler the sub-calls raise, saying so.
"""

from __future__ import annotations

import ast
import http.server
import json
import threading
import time
from typing import Any

from rlm.core.comms_utils import LMRequest, send_lm_request, send_lm_request_batched  # type: ignore[import-untyped]
from rlm.core.types import REPLResult  # type: ignore[import-untyped]
from rlm.environments.base_env import IsolatedEnv  # type: ignore[import-untyped]

from ._sync import Client, Session

#: What every session starts with: the names rlms' REPL prompt tells the model about.
SCAFFOLD = '''
answer = {"content": "", "ready": False}

def _arl_no_callback(*args, **kwargs):
    raise RuntimeError(
        "llm_query and rlm_query are not available here: this environment has no LM handler "
        "to call back; compute the answer in code and set answer['content']"
    )

llm_query = llm_query_batched = rlm_query = rlm_query_batched = _arl_no_callback

def SHOW_VARS():
    hidden = {"answer", "context", "SHOW_VARS", "llm_query", "llm_query_batched",
              "rlm_query", "rlm_query_batched"}
    return sorted(k for k in globals() if not k.startswith("_") and k not in hidden)
'''

#: What replaces the stubs when the RLM's model can be called back (the session's tools).
CALLBACKS = """
import arl as _arl

def llm_query(prompt, model=None):
    return _arl.tools.llm_query(prompt, model)

def llm_query_batched(prompts, model=None):
    return _arl.tools.llm_query_batched(list(prompts), model)

rlm_query, rlm_query_batched = llm_query, llm_query_batched
"""


class _Callbacks(http.server.ThreadingHTTPServer):
    """The endpoint the session's `llm_query` tools POST to: each call goes to rlms' LM handler
    at `address`; the completions are kept for the REPL result."""

    daemon_threads = True

    def __init__(self, host: str, address: tuple[str, int], depth: int) -> None:
        super().__init__((host, 0), _CallbackHandler)
        self.lm_address, self.depth = address, depth
        self.completions: list[Any] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, tool: str) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        return f"http://{host}:{port}/{tool}"

    def answer(self, tool: str, args: list[Any]) -> Any:
        model = args[1] if len(args) > 1 else None
        if tool == "llm_query":
            request = LMRequest(prompt=args[0], model=model, depth=self.depth)
            response = send_lm_request(self.lm_address, request)
            if not response.success:
                return f"Error: {response.error}"
            with self.lock:
                self.completions.append(response.chat_completion)
            return response.chat_completion.response
        responses = send_lm_request_batched(self.lm_address, args[0], model=model, depth=self.depth)
        out = []
        for response in responses:
            if not response.success:
                out.append(f"Error: {response.error}")
                continue
            with self.lock:
                self.completions.append(response.chat_completion)
            out.append(response.chat_completion.response)
        return out

    def take(self) -> list[Any]:
        with self.lock:
            taken, self.completions = self.completions, []
        return taken


class _CallbackHandler(http.server.BaseHTTPRequestHandler):
    server: _Callbacks

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        call = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
        try:
            body = json.dumps(self.server.answer(call["tool"], list(call.get("args", []))))
            status = 200
        except Exception as e:  # the guest sees it as a ToolError
            body, status = json.dumps(f"{type(e).__name__}: {e}"), 500
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


#: The cell that reads a finished answer (and marks it taken), or `None`.
TAKE_ANSWER = (
    "(lambda a: (a.__setitem__('ready', False), str(a.get('content')))[1] "
    "if isinstance(a, dict) and a.get('ready') else None)(globals().get('answer'))"
)


class ARLREPL(IsolatedEnv):  # type: ignore[misc]
    """rlms' REPL environment over one ARL session, deleted at `cleanup()`."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        lm_handler_address: tuple[str, int] | None = None,
        context_payload: dict[str, Any] | list[Any] | str | None = None,
        setup_code: str | None = None,
        persistent: bool = False,
        custom_tools: dict[str, Any] | None = None,
        callback_host: str = "127.0.0.1",
        depth: int = 1,
        **kwargs: Any,
    ) -> None:
        if persistent:
            raise NotImplementedError("persistent REPLs are not supported by the arl environment")
        for ignored in ("subcall_fn", "custom_sub_tools", "compaction"):
            kwargs.pop(ignored, None)
        super().__init__(persistent=persistent, **kwargs)
        self.lm_handler_address = lm_handler_address
        self.client = Client(base_url, token)
        self.session: Session | None = None
        self.custom_tools = dict(custom_tools or {})
        self.callbacks = (
            _Callbacks(callback_host, lm_handler_address, depth) if lm_handler_address else None
        )
        self.setup()
        if context_payload is not None:
            self.load_context(context_payload)
        if setup_code:
            self.execute_code(setup_code)

    def _session(self) -> Session:
        if self.session is None:
            raise RuntimeError("the environment was cleaned up")
        return self.session

    def setup(self) -> None:
        tools = None
        if self.callbacks is not None:
            tools = {t: {"url": self.callbacks.url(t)} for t in ("llm_query", "llm_query_batched")}
        self.session = self.client.create_session(tools=tools)
        self.session.execute(SCAFFOLD)
        if tools is not None:
            self.session.execute(CALLBACKS)
        values = {}
        for name, tool in self.custom_tools.items():
            value = tool["tool"] if isinstance(tool, dict) and "tool" in tool else tool
            if callable(value):
                raise ValueError(
                    f"custom tool {name!r} is a function: ARL sessions cannot call back into "
                    "the caller's process; pass data (JSON) instead"
                )
            values[name] = value
        if values:
            self.session.files.write(".arl_tools.json", json.dumps(values))
            self.session.execute(
                "import json as _json\n"
                "globals().update(_json.load(open('.arl_tools.json')))\n"
                "del _json"
            )

    def load_context(self, context_payload: dict[str, Any] | list[Any] | str) -> None:
        """Puts the RLM's prompt in the REPL as `context` (text, or JSON's values)."""
        session = self._session()
        if isinstance(context_payload, str):
            session.files.write("context.txt", context_payload)
            session.execute("context = open('context.txt', encoding='utf-8').read()")
        else:
            session.files.write("context.json", json.dumps(context_payload))
            session.execute(
                "import json as _json\ncontext = _json.load(open('context.json'))\ndel _json"
            )

    def execute_code(self, code: str) -> REPLResult:
        session = self._session()
        started = time.perf_counter()
        execution = session.execute(code)
        stdout = execution.stdout
        if execution.result is not None:
            stdout += execution.result + "\n"
        stderr = execution.stderr + (execution.error.traceback if execution.error else "")
        taken = session.execute(TAKE_ANSWER).result
        final = ast.literal_eval(taken) if taken is not None else None
        return REPLResult(
            stdout=stdout,
            stderr=stderr,
            locals={},
            execution_time=time.perf_counter() - started,
            rlm_calls=self.callbacks.take() if self.callbacks is not None else [],
            final_answer=final,
        )

    def cleanup(self) -> None:
        if self.session is not None:
            self.session.delete()
            self.session = None
        if self.callbacks is not None:
            self.callbacks.shutdown()
            self.callbacks.server_close()
            self.callbacks = None
        self.client.close()


def register() -> None:
    """Makes `RLM(environment="arl", environment_kwargs={...})` build an `ARLREPL`: rlms
    picks environments by a fixed list of names, so its lookup is wrapped (once)."""
    import rlm.core.rlm as core  # type: ignore[import-untyped]
    import rlm.environments as environments  # type: ignore[import-untyped]

    original = environments.get_environment
    if getattr(original, "arl", False):
        return

    def get_environment(environment: str, environment_kwargs: dict[str, Any]) -> Any:
        if environment == "arl":
            return ARLREPL(**environment_kwargs)
        return original(environment, environment_kwargs)

    setattr(get_environment, "arl", True)
    environments.get_environment = get_environment
    core.get_environment = get_environment
