"""`code`: a small Python repository with a missing function or a bug, and its unit tests.

Action language (one per step):

    ls                    list the files
    read PATH             show a file
    write PATH            replace (or create) a file with the lines after this one
    run tests             run the tests in the sandbox and show the result
    submit                grade: the original tests, run in the sandbox, must all pass

Reward: 1 when every original test passes at `submit` (the repository's test files are put
back first, so editing the tests does not help), else 0. Every test run happens in
`onthejob.envs.sandbox`; when the sandbox stops a run (timeout, memory, ...) the step's
`info["fault"]` names it and the episode ends: the rollout is a fault, not a reward of 0.

Known gap: the tests run in the same process as the code under test, so code written to
fool the runner (print a fake "passed" line and `os._exit(0)` at import) would be graded a
pass. Nothing a small model writes by accident does this; a stronger grader would run
each test in its own sandboxed process and compare results computed outside it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from onthejob.envs.base import Env, EnvError, StepResult
from onthejob.envs.code_repos import RUNNER, make_code_task
from onthejob.envs.sandbox import Limits, run_python

_MAX_FILE = 20_000
# state = (seed, files, steps, done)
HELP = "actions: ls | read PATH | write PATH (then the file's lines) | run tests | submit"


class CodeEnv(Env):
    name = "code"
    version = "1"

    def __init__(self, max_steps: int = 12, variant: str | None = None,
                 cpu_s: int = 5, wall_s: float = 10.0) -> None:
        super().__init__(max_steps=max_steps, variant=variant, cpu_s=cpu_s, wall_s=wall_s)
        self.max_steps, self.variant = max_steps, variant
        self.limits = Limits(cpu_s=cpu_s, wall_s=wall_s, memory_mb=512, file_mb=4, processes=16)
        self._s: tuple | None = None

    def reset(self, seed: int) -> str:
        task = make_code_task(seed, self.variant)
        self._s = (seed, task.files, 0, False)
        listing = "\n".join(f"--- {path}\n{text}" for path, text in task.files if text)
        return f"Task: {task.description}\n{HELP}\n\nRepository:\n{listing}"

    def snapshot(self) -> tuple | None:
        return self._s

    def restore(self, state: tuple | None) -> None:
        self._s = state

    def step(self, action: str) -> StepResult:
        if self._s is None:
            raise EnvError("call reset(seed) before step()")
        seed, files, steps, done = self._s
        if done:
            raise EnvError("the episode is over: call reset(seed)")
        head, _, body = action.strip().partition("\n")
        words = head.split()
        verb = words[0].lower() if words else ""
        reward, done, info = 0.0, False, {}
        if verb == "ls":
            observation = "\n".join(path for path, _ in files)
        elif verb == "read" and len(words) == 2:
            observation = dict(files).get(words[1], f"error: no file {words[1]}")
        elif verb == "write" and len(words) == 2:
            observation, files = self._write(files, words[1], body)
        elif verb == "run" and words[1:] == ["tests"]:
            observation, info = self._test(files)
        elif verb == "submit":
            original = dict(make_code_task(seed, self.variant).files)
            graded = {**dict(files), **{p: t for p, t in original.items() if p.startswith("tests/")}}
            observation, info = self._test(tuple(sorted(graded.items())))
            reward = 1.0 if info.get("passed") and not info.get("fault") else 0.0
            done = True
        else:
            observation = f"error: unknown action {head[:40]!r}; {HELP}"
        steps += 1
        if "fault" in info:
            done = True
        elif not done and steps >= self.max_steps:
            done, observation = True, observation + "\nout of steps: the episode has ended"
            info = {**info, "truncated": True}
        self._s = (seed, files, steps, done)
        return StepResult(observation, reward, done, info)

    def _write(self, files: tuple, path: str, body: str) -> tuple[str, tuple]:
        rel = PurePosixPath(path)
        if rel.is_absolute() or ".." in rel.parts or not path.endswith(".py"):
            return f"error: {path} must be a relative path to a .py file inside the repo", files
        if len(body) > _MAX_FILE:
            return f"error: a file may have at most {_MAX_FILE} characters", files
        text = body if body.endswith("\n") or not body else body + "\n"
        new = dict(files)
        new[str(rel)] = text
        return f"wrote {rel} ({len(text)} characters)", tuple(sorted(new.items()))

    def _test(self, files: tuple) -> tuple[str, dict]:
        result = run_python(RUNNER, dict(files), self.limits)
        if result.fault:
            return (f"the sandbox stopped the tests: {result.fault}",
                    {"fault": result.fault, "isolation": result.isolation})
        lines = result.stdout.strip().splitlines()
        summary = lines[-1] if lines and lines[-1].startswith("passed ") else ""
        if not summary:  # the runner itself failed: report its last words, deterministically
            tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            return f"error: the tests could not run: {tail[0][:200]}", {"passed": False}
        return result.stdout.strip(), {"passed": result.exit_code == 0}
