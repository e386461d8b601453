"""The validity gate before any training on a dreamed environment (not the promotion gate
on an adapter, learn/gate.py). A task passes only if:

1. reset is deterministic: two fresh environments reset to the same observation and state
   hash, and the same answer on two forks gives the same reward and state hash;
2. the teacher (the model *with* the session) solves it: its greedy answer earns at least
   `pass_reward`;
3. an empty answer, a random answer (random vocabulary tokens) and another task's expected
   answer all earn less than `pass_reward` (a checker that accepts anything teaches nothing);
4. for GRPO only (`require_spread`): rewards spread across a group of student samples (the
   model *without* the session, the very samples GRPO would learn from): a task that all
   pass or all fail has no advantage to learn from. OPSD learns from the teacher, not from
   reward differences, so for it a task the teacher solves and every student sample fails
   is the most useful kind: it passes, with `spread` saying what GRPO would make of it.
A sandbox fault in any check rejects the task. Rejected tasks are kept with the reason.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from onthejob.dream.env import DreamEnv
from onthejob.dream.tasks import DreamTask
from onthejob.learn.evaluate import ANSWER_HINT, normalize
from onthejob.model import LoadedModel, SamplingParams, generate, render_ids
from onthejob.model.chat import Message


@dataclass
class DreamGateConfig:
    pass_reward: float = 1.0  # "solved"
    group: int = 6  # student samples per task
    temperature: float = 1.0
    min_spread: float = 0.2  # max - min reward across the group
    require_spread: bool = True  # GRPO needs it; OPSD-mode dreaming does not (module docstring)
    max_new_tokens: int = 48  # the model restates the question before answering
    seed: int = 0


@dataclass
class EnvVerdict:
    task: str
    passed: bool
    reason: str
    teacher_answer: str = ""
    teacher_reward: float = 0.0
    empty_reward: float = 0.0
    random_reward: float = 0.0
    decoy_reward: float = 0.0
    group_rewards: list[float] = field(default_factory=list)
    state_hash: str = ""
    spread: bool = False  # the group's rewards differ (GRPO can learn from it)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateReport:
    verdicts: list[EnvVerdict]
    tokens: int = 0

    @property
    def passed(self) -> list[str]:
        return [v.task for v in self.verdicts if v.passed]


def _prompts(lm: LoadedModel, context: Sequence[Message], questions: Sequence[str]) -> list[list[int]]:
    return [render_ids(lm.tokenizer, [*context, {"role": "user", "content": q + ANSWER_HINT}])
            for q in questions]


def _generate(lm: LoadedModel, prompts: list[list[int]], params: SamplingParams,
              batch: int = 16) -> tuple[list[str], int]:
    texts, tokens = [], 0
    for start in range(0, len(prompts), batch):
        for c in generate(lm, prompts[start:start + batch], params):
            texts.append(c.text)
            tokens += len(c.prompt_ids) + len(c.token_ids)
    return texts, tokens


def _step(task: DreamTask, answer: str) -> tuple[float, str | None, str]:
    env = DreamEnv(tasks=[task])
    env.reset(0)
    result = env.step(answer)
    return result.reward, result.info.get("fault"), env.state_hash()


def random_answer(lm: LoadedModel, rng: random.Random, n: int = 4) -> str:
    return lm.tokenizer.decode([rng.randrange(lm.tokenizer.vocab_size) for _ in range(n)])


def deterministic(task: DreamTask, answer: str) -> tuple[bool, str]:
    """Two fresh resets agree, and the same answer on two forks gives the same result."""
    a, b = DreamEnv(tasks=[task]), DreamEnv(tasks=[task])
    if a.reset(0) != b.reset(0) or a.state_hash() != b.state_hash():
        return False, ""
    first, second = a.fork(2)
    r1, r2 = first.step(answer), second.step(answer)
    same = (r1.reward == r2.reward and r1.observation == r2.observation
            and first.state_hash() == second.state_hash())
    return same, a.state_hash()


def judge(task: DreamTask, cfg: DreamGateConfig, teacher_answer: str, student_answers: Sequence[str],
          random_text: str, decoy: str | None) -> EnvVerdict:
    """The verdict on one task, given the model's answers (pure: no model calls)."""
    v = EnvVerdict(task.id, False, "", teacher_answer=teacher_answer)
    same, v.state_hash = deterministic(task, teacher_answer)
    if not same:
        v.reason = "reset or reward is not deterministic"
        return v
    checks = [("teacher", teacher_answer), ("empty", ""), ("random", random_text)]
    if decoy is not None:
        checks.append(("decoy", decoy))
    for name, answer in checks:
        reward, fault, _ = _step(task, answer)
        if fault:
            v.reason = f"checker fault on the {name} answer: {fault}"
            return v
        setattr(v, f"{name}_reward", reward)
    if v.teacher_reward < cfg.pass_reward:
        v.reason = f"the teacher (with the session) fails it: reward {v.teacher_reward:.2f}"
        return v
    for name in ("empty", "random", "decoy"):
        if getattr(v, f"{name}_reward") >= cfg.pass_reward:
            v.reason = f"accepts a{'n' if name == 'empty' else ''} {name} answer"
            return v
    for answer in student_answers:
        reward, fault, _ = _step(task, answer)
        if fault:
            v.reason = f"checker fault on a student sample: {fault}"
            return v
        v.group_rewards.append(reward)
    spread = max(v.group_rewards) - min(v.group_rewards) if v.group_rewards else 0.0
    v.spread = spread >= cfg.min_spread
    if not v.spread:
        mean = sum(v.group_rewards) / max(len(v.group_rewards), 1)
        kind = "all pass" if mean >= cfg.pass_reward else "all fail" if mean < 0.5 else "all alike"
        what = (f"no reward spread across {len(v.group_rewards)} student samples ({kind}: "
                f"spread {spread:.2f} < {cfg.min_spread})")
        if cfg.require_spread:
            v.reason = f"{what}; it teaches GRPO nothing"
            return v
        v.passed, v.reason = True, f"passed for OPSD (the teacher solves it; {what})"
        return v
    v.passed, v.reason = True, "passed"
    return v


def gate(lm: LoadedModel, context: Sequence[Message], tasks: Sequence[DreamTask],
         cfg: DreamGateConfig | None = None) -> GateReport:
    """Run the gate on every task: teacher answers (with `context`) and student groups
    (without it) are generated in batches, then each task is judged."""
    cfg = cfg or DreamGateConfig()
    report = GateReport([])
    if not tasks:
        return report
    questions = [t.question for t in tasks]
    greedy = SamplingParams(max_tokens=cfg.max_new_tokens)
    teacher, n = _generate(lm, _prompts(lm, context, questions), greedy)
    report.tokens += n
    sampled = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=cfg.seed)
    student_prompts = [p for p in _prompts(lm, (), questions) for _ in range(cfg.group)]
    student, n = _generate(lm, student_prompts, sampled) if cfg.group else ([], 0)
    report.tokens += n
    rng = random.Random(cfg.seed)
    for i, task in enumerate(tasks):
        others = [a for j, t in enumerate(tasks) if j != i for a in t.answers
                  if normalize(a) and not any(normalize(a) in normalize(b) or normalize(b) in normalize(a)
                                              for b in task.answers)]
        decoy = rng.choice(others) if others else None
        group = student[i * cfg.group:(i + 1) * cfg.group]
        report.verdicts.append(judge(task, cfg, teacher[i], group, random_answer(lm, rng), decoy))
    return report
