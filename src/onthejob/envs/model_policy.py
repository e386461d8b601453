"""The language model as a policy: one batched `generate` call per step for the whole group.

Runs in the parent process (`lockstep = True`): `run_group` ships only the environment steps
to workers, so the weights are never pickled or copied. The observation is the user turn of
a fresh chat (observations carry their task), rendered with the one chat renderer.
"""

from __future__ import annotations

from typing import Any

from onthejob.envs.policies import Action

SYSTEM = "You are an agent acting in a text environment. Reply with one action only."


class ModelPolicy:
    lockstep = True

    def __init__(self, lm: Any, params: Any = None, system: str | None = SYSTEM) -> None:
        from onthejob.model import SamplingParams

        self.lm = lm
        self.params = params or SamplingParams(max_tokens=64, temperature=1.0)
        self.system = system

    def prompt_ids(self, observation: str) -> list[int]:
        from onthejob.model import render_ids

        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": observation})
        return render_ids(self.lm.tokenizer, messages)

    def act(self, observations: list[str]) -> list[Action]:
        from onthejob.model import generate

        prompts = [self.prompt_ids(o) for o in observations]
        completions = generate(self.lm, prompts, self.params)
        return [Action(c.text, c.prompt_ids, c.token_ids, c.logprobs) for c in completions]
