"""`dream`: an environment made of dreamed tasks, one question per episode.

`DreamEnv(tasks=[...])`: `reset(seed)` poses task `seed % len(tasks)`; the action is the
answer text; one step; the reward comes from the task's checker:
  - "match": 1.0 when an expected answer appears in the answer after SQuAD normalization,
    else the best token F1 against the expected answers (partial credit, so a group of
    samples has a reward spread to learn from);
  - "program": the model-written expression `check(answer)` runs only in the sandbox
    (onthejob.envs.sandbox); its value (a bool or a number) is clipped to [0, 1]. When the
    sandbox stops it (timeout, memory, ...) the step's `info["fault"]` names it and the
    reward is 0 with the fault recorded, so trainers leave it out.
"""

from __future__ import annotations

import json
from typing import Any

from onthejob.dream.tasks import DreamTask
from onthejob.envs.base import Env, EnvError, StepResult
from onthejob.envs.registry import register
from onthejob.envs.sandbox import Limits, run_python
from onthejob.learn.evaluate import ANSWER_HINT, contains, f1

_CHECK_LIMITS = Limits(cpu_s=2, wall_s=5.0, memory_mb=256, file_mb=1, processes=4)
_HARNESS = """\
import json, sys
answer = open("answer.txt", encoding="utf-8").read()
def check(answer):
    return {expression}
value = check(answer)
if isinstance(value, bool) or isinstance(value, (int, float)):
    print(json.dumps({{"value": float(value)}}))
else:
    print(json.dumps({{"error": "check returned " + type(value).__name__}}))
"""


def match_reward(answer: str, expected: list[str]) -> float:
    if any(contains(answer, gold) for gold in expected):
        return 1.0
    return max((f1(answer, gold) for gold in expected), default=0.0)


def program_reward(answer: str, expression: str) -> tuple[float, dict]:
    """Run the check in the sandbox; (reward, info) with info["fault"] when it was stopped."""
    result = run_python(_HARNESS.format(expression=expression), {"answer.txt": answer},
                        _CHECK_LIMITS)
    info: dict[str, Any] = {"isolation": result.isolation}
    if result.fault:
        return 0.0, {**info, "fault": result.fault}
    try:
        out = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return 0.0, {**info, "error": tail}
    if "error" in out:
        return 0.0, {**info, "error": out["error"]}
    return min(max(out["value"], 0.0), 1.0), info


def task_reward(task: DreamTask, answer: str) -> tuple[float, dict]:
    if task.checker == "program":
        return program_reward(answer, task.program)
    if task.checker == "match":
        return match_reward(answer, task.answers), {}
    raise EnvError(f"unknown checker {task.checker!r}")


class DreamEnv(Env):
    name = "dream"
    version = "1"

    def __init__(self, tasks: list[dict] | None = None) -> None:
        if not tasks:
            raise EnvError("a dream environment needs at least one task")
        parsed = [t if isinstance(t, DreamTask) else DreamTask.from_dict(t) for t in tasks]
        super().__init__(tasks=[t.to_dict() for t in parsed])
        self.tasks = parsed
        self._state: tuple | None = None  # (index, done, last observation)

    def reset(self, seed: int) -> str:
        index = seed % len(self.tasks)
        observation = self.tasks[index].question + ANSWER_HINT
        self._state = (index, False, observation)
        return observation

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise EnvError("call reset(seed) before step()")
        index, done, _ = self._state
        if done:
            raise EnvError("the episode is over: call reset(seed)")
        reward, info = task_reward(self.tasks[index], action)
        observation = f"reward {reward:.3f}"
        self._state = (index, True, observation)
        return StepResult(observation, reward, True, {"task": self.tasks[index].id, **info})

    def snapshot(self) -> tuple | None:
        return self._state

    def restore(self, state: tuple | None) -> None:
        self._state = tuple(state) if state is not None else None


register("dream", DreamEnv)
