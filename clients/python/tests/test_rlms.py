"""The `arl` environment of the `rlms` library: an RLM completion whose REPL code runs in an
ARL session, with a stub model standing in for the LLM."""

from typing import Any

import pytest

import arl.rlms
from rlm import RLM  # type: ignore[import-untyped]
from rlm.clients.base_lm import BaseLM  # type: ignore[import-untyped]
from rlm.core.types import ModelUsageSummary, UsageSummary  # type: ignore[import-untyped]
import rlm.core.rlm as rlm_core  # type: ignore[import-untyped]


class StubLM(BaseLM):  # type: ignore[misc]
    """Answers with REPL code: the first turn computes in the sandbox, the second finishes."""

    def __init__(self) -> None:
        super().__init__(model_name="stub")
        self.prompts: list[Any] = []
        self.sub_calls: list[str] = []

    def completion(self, prompt: Any) -> str:
        if isinstance(prompt, str) and prompt.startswith("SUB:"):
            self.sub_calls.append(prompt)  # llm_query from the sandbox, through the tool
            return "forty-five"
        self.prompts.append(prompt)
        if len(self.prompts) == 1:
            return "```repl\nimport sys\nwhere = sys.platform\ntotal = sum(range(10))\nsaid = llm_query('SUB: spell 45')\nprint(where, total, len(context), said)\n```"
        return "```repl\nanswer['content'] = f'{where}:{total}:{said}'\nanswer['ready'] = True\n```"

    async def acompletion(self, prompt: Any) -> str:
        return self.completion(prompt)

    def get_usage_summary(self) -> UsageSummary:
        return UsageSummary({"stub": self.get_last_usage()})

    def get_last_usage(self) -> ModelUsageSummary:
        return ModelUsageSummary(len(self.prompts), 0, 0)


def test_an_rlm_completion_runs_its_repl_code_in_arl(
    url: str, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = StubLM()
    monkeypatch.setattr(rlm_core, "get_client", lambda backend, kwargs: stub)
    arl.rlms.register()
    before = len(arl.Client(url, token).sessions())
    rlm = RLM(
        backend="openai",
        environment="arl",
        environment_kwargs={"base_url": url, "token": token},
        max_iterations=4,
    )
    done = rlm.completion("What is the sum of 0..9, and where does the code run?")
    assert done.response == "wasi:45:forty-five", done.response
    assert len(stub.prompts) == 2
    assert stub.sub_calls == ["SUB: spell 45"], "llm_query in the sandbox called the model back"
    # The first turn's output (printed in the sandbox) went back to the model.
    assert "wasi 45 53 forty-five" in str(stub.prompts[1]), "53: the prompt's length"
    assert len(arl.Client(url, token).sessions()) == before, "the session is cleaned up"


def test_the_environment_says_why_sub_calls_fail_without_a_handler(url: str, token: str | None) -> None:
    env = arl.rlms.ARLREPL(base_url=url, token=token, context_payload={"k": [1, 2]})
    try:
        seen = env.execute_code("print(context['k'])\nSHOW_VARS()")
        assert seen.stdout.startswith("[1, 2]\n"), seen.stdout
        failed = env.execute_code("llm_query('hi')")
        assert "has no LM handler to call back" in failed.stderr
        assert env.execute_code("answer['content'] = 7; answer['ready'] = True").final_answer == "7"
    finally:
        env.cleanup()
