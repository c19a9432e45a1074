"""An `arl` environment for the `rlms` library (PyPI `rlms`, the recursive-language-model
REPL loop): the REPL code an RLM writes runs in an ARL session. Install with the `rlms` extra.

    import arl.rlms
    from rlm import RLM

    arl.rlms.register()  # teaches rlm.get_environment the name "arl"
    rlm = RLM(backend="openai", backend_kwargs={...}, environment="arl",
              environment_kwargs={"base_url": "http://127.0.0.1:8080"})

The REPL holds `context` (the prompt the RLM was given), `answer` (set `answer["content"]`
and `answer["ready"] = True` to finish, as with rlms' own environments) and `SHOW_VARS()`.
`llm_query` and the other sub-calls need the sandbox to call back the caller's model, which
ARL's guests cannot do yet: they raise, saying so.
"""

from __future__ import annotations

import ast
import json
import time
from typing import Any

from rlm.core.types import REPLResult  # type: ignore[import-untyped]
from rlm.environments.base_env import IsolatedEnv  # type: ignore[import-untyped]

from ._sync import Client, Session

#: What every session starts with: the names rlms' REPL prompt tells the model about.
SCAFFOLD = '''
answer = {"content": "", "ready": False}

def _arl_no_callback(*args, **kwargs):
    raise RuntimeError(
        "llm_query and rlm_query are not available in ARL sessions: the sandbox cannot call "
        "back the model yet; compute the answer in code and set answer['content']"
    )

llm_query = llm_query_batched = rlm_query = rlm_query_batched = _arl_no_callback

def SHOW_VARS():
    hidden = {"answer", "context", "SHOW_VARS", "llm_query", "llm_query_batched",
              "rlm_query", "rlm_query_batched"}
    return sorted(k for k in globals() if not k.startswith("_") and k not in hidden)
'''

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
        self.session = self.client.create_session()
        self.session.execute(SCAFFOLD)
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
            final_answer=final,
        )

    def cleanup(self) -> None:
        if self.session is not None:
            self.session.delete()
            self.session = None
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
