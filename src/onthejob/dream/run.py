"""A dream run: one session -> dreamed tasks -> the environment gate -> training within a
budget -> consolidation's adapter gate and registry.

Every run is a row of the runs table (kind "dream", its phase and progress updated as it
goes) and a JSON file, $ONTHEJOB_HOME/dreams/<run id>.json, holding every task written,
every one dropped at parsing (with the problem) and every gate verdict (with the reason).

A run whose process died (killed, crashed, a server stopped mid-job) is marked interrupted
by the next dream of the same work (same session and options), which resumes it: the
tasks it wrote and gated are reused from its file, and training goes on from its last
step's checkpoint, as consolidation does (tests/test_faults.py kills it at named points).

Training modes: "opsd" (teacher = the model with the session, student prompts = the
dreamed questions that passed the gate), "grpo" (onthejob.learn.grpo on a DreamEnv of
those tasks: the checker's reward, group-relative advantages) and "both" (the two on
alternate steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from onthejob import config, faults
from onthejob.dream.tasks import DreamTask, DreamWriting, check_writer, materials, write_tasks
from onthejob.dream.validity import DreamGateConfig, EnvVerdict, GateReport, gate
from onthejob.learn.consolidate import (
    ConsolidateOptions,
    Outcome,
    StopTraining,
    checkpoint_dir,
    recommended_opsd,
    shared_below,
    train_and_gate,
)
from onthejob.learn.drift import TRAINING_ANCHORS
from onthejob.learn.gate import GateConfig
from onthejob.learn.lesson import Lesson, check_fits, kept_answers, teacher_context
from onthejob.learn.loop import TrainConfig, config_dict
from onthejob.learn.opsd import Opsd, OpsdConfig
from onthejob.learn.practice import PracticePrompt, practice_prompts
from onthejob.model import LoadedModel
from onthejob.model.adapters import use_adapter
from onthejob.store import Run, Store

MODES = ("opsd", "grpo", "both")
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(steps?|tokens?|tok|k?tokens|min|mins|minutes?|m)?\s*$",
                     re.I)


@dataclass(frozen=True)
class Budget:
    """A cap on training compute: steps, tokens (student + teacher) or minutes."""

    kind: str
    amount: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        found = _BUDGET.match(str(text))
        if not found or float(found.group(1)) <= 0:
            raise ValueError(f"budget {text!r}: write a positive number of steps, tokens or "
                             "minutes, e.g. 20, 20steps, 50000tokens, 5min")
        amount, unit = float(found.group(1)), (found.group(2) or "steps").lower()
        if unit.startswith("step"):
            return cls("steps", int(amount))
        if unit.startswith("m"):
            return cls("minutes", amount)
        return cls("tokens", amount)

    def __str__(self) -> str:
        return f"{self.amount:g} {self.kind}"


class Budgeted:
    """A learning rule under a budget: it raises StopTraining at the start of the first step
    that would exceed it (every budget allows at least one step)."""

    def __init__(self, rule, budget: Budget):
        self.rule, self.budget = rule, budget
        self.name = rule.name
        self.started: float | None = None
        self.steps = 0

    @property
    def tokens_student(self) -> int:  # GRPO counts the sampled tokens it trained on
        return getattr(self.rule, "tokens_student", 0) or getattr(self.rule, "tokens_trained", 0)

    @property
    def tokens_teacher(self) -> int:
        return getattr(self.rule, "tokens_teacher", 0)

    def spent(self) -> float:
        if self.budget.kind == "steps":
            return self.steps
        if self.budget.kind == "minutes":
            return (time.time() - self.started) / 60 if self.started else 0.0
        return self.tokens_student + self.tokens_teacher

    def prepare(self, trainer) -> None:
        self.rule.prepare(trainer)

    def step(self, trainer, step: int):
        if self.started is None:
            self.started = time.time()
        elif self.spent() >= self.budget.amount:
            raise StopTraining(f"budget of {self.budget} spent")
        self.steps += 1
        return self.rule.step(trainer, step)


@dataclass
class DreamOptions:
    mode: str = "opsd"
    budget: Budget = field(default_factory=lambda: Budget("steps", 20))
    checker: str = "match"
    max_tasks: int = 24
    style: str = "span"  # the task writer (dream/tasks.py): "span" (answer first), "qa", "rule"
    attempts: int = 3  # tries per task (the first greedy, the others sampled)
    fallback: str = "rule"  # a span with no parsed question -> a question made by rule
    held_out_share: float = 0.25
    with_probes: bool = True  # the session's practice material (learn/practice.py) beside the dreams
    grpo_starts: int = 2  # GRPO: tasks per step (each with a group of env_gate.group answers)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=20, lr=3e-3))
    opsd: OpsdConfig = field(default_factory=recommended_opsd)  # consolidation's recipe
    gate: GateConfig = field(default_factory=GateConfig)
    env_gate: DreamGateConfig = field(default_factory=DreamGateConfig)

    def max_steps(self) -> int:
        return int(self.budget.amount) if self.budget.kind == "steps" else 10_000


@dataclass
class DreamOutcome:
    run_id: int
    status: str  # "promoted", "rejected", "nothing" (no environment passed the gate)
    message: str
    written: int = 0  # the model's attempts
    parsed: int = 0  # the model's attempts that parsed
    passed: int = 0  # tasks (the model's and the fallbacks) that passed the gate
    by_rule: int = 0  # rule-made tasks (the rule or cloze fallbacks, or the rule style)
    adapter_version: int | None = None
    metrics: dict = field(default_factory=dict)


def dream_file(run_id: int) -> Path:
    return config.home() / "dreams" / f"{run_id}.json"


def load_dream(run_id: int) -> dict:
    path = dream_file(run_id)
    if not path.exists():
        raise FileNotFoundError(f"no dream file for run {run_id} at {path}: the run did not get "
                                "as far as writing tasks (see `onthejob runs`/the run's error)")
    return json.loads(path.read_text())


def _save(run_id: int, record: dict) -> None:
    path = dream_file(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


class Alternating:
    """`--mode both`: OPSD (session as teacher) and GRPO (dreamed rewards) on alternate steps."""

    name = "dream-both"

    def __init__(self, opsd, grpo):
        self.opsd, self.grpo = opsd, grpo

    @property
    def tokens_student(self) -> int:
        return self.opsd.tokens_student + self.grpo.tokens_student

    @property
    def tokens_teacher(self) -> int:
        return self.opsd.tokens_teacher

    def prepare(self, trainer) -> None:
        self.opsd.prepare(trainer)
        self.grpo.prepare(trainer)

    def step(self, trainer, step: int):
        loss, metrics = (self.opsd if step % 2 == 0 else self.grpo).step(trainer, step)
        return loss, {k: v for k, v in metrics.items() if isinstance(v, float)}


class _CountingPolicy:
    """A rollout policy that counts what it samples: generated tokens plus each distinct
    prompt once (a group's shared prompt is encoded once)."""

    def __init__(self, policy, owner):
        self._policy, self._owner = policy, owner

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def act(self, observations):
        actions = self._policy.act(observations)
        prompts = {tuple(a.prompt_ids or ()) for a in actions}
        self._owner.tokens_sampled += (sum(len(p) for p in prompts)
                                       + sum(len(a.token_ids or ()) for a in actions))
        return actions


def grpo_rule(tasks: Sequence[DreamTask], opts: DreamOptions, run_id: str | None = None):
    """GRPO (onthejob.learn.grpo) on a DreamEnv of the tasks: a group of student answers per
    task, rewarded by the task's checker; no system prompt, as the gate's student samples.
    Its `tokens_student` counts every sampled rollout (flat groups included: they cost
    compute even when they teach nothing), so token budgets and the bench's compute are
    comparable with OPSD's."""
    try:
        from onthejob.learn.grpo import Grpo, GrpoConfig
    except ImportError:
        raise ValueError(f"--mode {opts.mode} needs the GRPO rule (onthejob.learn.grpo), which "
                         "this installation does not have; use --mode opsd") from None
    import onthejob.dream.env  # noqa: F401 - registers "dream"

    class DreamGrpo(Grpo):
        tokens_sampled = 0
        tokens_teacher = 0

        @property
        def tokens_student(self) -> int:
            return self.tokens_sampled

        def policy(self, trainer):
            return _CountingPolicy(super().policy(trainer), self)

    cfg = GrpoConfig(env="dream", options={"tasks": [t.to_dict() for t in tasks]},
                     group=opts.env_gate.group, starts=opts.grpo_starts,
                     max_new_tokens=opts.env_gate.max_new_tokens, system=None)
    return DreamGrpo(cfg, run_id=run_id)


def build_rule(lm: LoadedModel, lesson: Lesson, tasks: Sequence[DreamTask], opts: DreamOptions,
               run_id: str | None = None):
    """The training rule for `opts.mode`, under the budget."""
    if opts.mode not in MODES:
        raise ValueError(f"unknown mode {opts.mode!r}; choose one of {', '.join(MODES)}")
    if opts.mode == "opsd":
        rule = Opsd([lesson], list(TRAINING_ANCHORS), opts.opsd)
    elif opts.mode == "grpo":
        rule = grpo_rule(tasks, opts, run_id)
    else:
        rule = Alternating(Opsd([lesson], list(TRAINING_ANCHORS), opts.opsd),
                           grpo_rule(tasks, opts, run_id))
    return Budgeted(rule, opts.budget)


def dream_session(lm: LoadedModel, context: list, title: str, opts: DreamOptions,
                  say: Callable[[str], None] = print) -> tuple[DreamWriting, GateReport, float]:
    """Write and gate the tasks of one session's context (the model as it is served now)."""
    started = time.time()
    material = materials(context)
    writing = write_tasks(lm, material, title, opts.checker, opts.max_tasks, style=opts.style,
                          attempts=opts.attempts, fallback=opts.fallback, seed=opts.env_gate.seed)
    c = writing.counts()
    say(f"dreamed {c['parsed']} tasks from {c['written']} attempts on {c['units']} "
        f"{'sentences' if opts.style == 'qa' else 'answer spans'} (parse rate "
        f"{writing.parse_rate:.0%}) + {c['by_rule']} rule-made ({opts.fallback} fallback"
        f"{', rule style' if opts.style == 'rule' else ''}) in "
        f"{time.time() - started:.0f} s")
    report = gate(lm, context, writing.tasks, opts.env_gate)
    say(f"gate: {len(report.passed)}/{len(writing.tasks)} environments passed "
        f"({time.time() - started:.0f} s so far)")
    return writing, report, time.time() - started


def dream(store: Store, lm: LoadedModel, tenant: str, session_id: str, opts: DreamOptions,
          say: Callable[[str], None] = print, run_id: int | None = None) -> DreamOutcome:
    """Dream one session of `tenant` and train on it; see the module docstring."""
    if opts.mode not in MODES:
        raise ValueError(f"unknown mode {opts.mode!r}; choose one of {', '.join(MODES)}")
    if opts.style == "span" and opts.checker == "program":
        opts.style = "qa"  # program checks are written by the "qa" writer only
    check_writer(opts.style, opts.checker, opts.fallback)  # before a run is created
    # Reward spread is what GRPO learns from; OPSD learns from the teacher (dream/validity.py).
    opts.env_gate = replace(opts.env_gate, require_spread=opts.mode == "grpo")
    session = store.get_session(tenant, session_id)  # NotFound for a foreign or unknown session
    messages = store.messages(tenant, session_id)
    review = store.get_review(tenant, session_id)
    context = teacher_context(messages, review.text if review else "")
    if not context:
        raise ValueError(f"session {session_id} is empty: there is nothing to dream about")
    # The session's answers' kept log-probs, where the adapters that served them are those the
    # teacher runs with (the tenant's active adapter over the shared one): OPSD reuses them.
    parent = store.active_adapter(tenant)
    teacher = [*shared_below(store, tenant), *([parent.path] if parent else [])]
    kept, _ = kept_answers(messages, store.kept_logprobs(tenant, session_id), teacher)
    lesson = Lesson(session.id, context, title=session.title or "", kept=kept)
    check_fits(lm, lesson)
    opts.train.steps = opts.max_steps()
    params = {"session": session_id, "mode": opts.mode, "budget": str(opts.budget),
              "checker": opts.checker, "style": opts.style, "attempts": opts.attempts,
              "fallback": opts.fallback, "train": config_dict(opts.train), "opsd": asdict(opts.opsd),
              "gate": asdict(opts.gate), "env_gate": asdict(opts.env_gate)}
    for dead in store.interrupt_dead_runs():
        say(f"run {dead.id} ({dead.kind}) had stopped mid-way; marked interrupted")
    work = work_key(params)
    resumed = _resumable(store, tenant, work)
    if run_id is None:
        run_id = store.create_run("dream", tenant, params={
            **params, "resumed_from": resumed.id if resumed else None}).id
    store.update_run(run_id, status="running", progress={
        "phase": "writing", "work": work, "resumed_from": resumed.id if resumed else None})
    carried = None
    if resumed is not None:
        carried = _take_over(store, resumed, run_id)
        say(f"resuming interrupted dream run {resumed.id}: "
            + ("its gated tasks" if carried else "its session")
            + (" and its training checkpoint" if (checkpoint_dir(run_id) / "state.pt").exists()
               else ""))
    try:
        return _dream(store, lm, tenant, session, messages, review, lesson, opts, say, run_id,
                      carried)
    except BaseException as exc:
        store.update_run(run_id, status="failed", progress={"phase": "failed"},
                         error=f"{type(exc).__name__}: {exc}\n" + traceback.format_exc(limit=5))
        raise


def work_key(params: dict) -> str:
    """What a dream run does, as a digest: runs with the same key do the same work."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resumable(store: Store, tenant: str, work: str) -> Run | None:
    """The latest interrupted dream run of the same work that no later run took over."""
    for run in store.list_runs("dream", tenant, status="interrupted", limit=10):
        if run.progress.get("work") == work and not run.progress.get("resumed_by"):
            return run
    return None


def _take_over(store: Store, dead: Run, run_id: int) -> dict | None:
    """Move the dead run's training checkpoint to `run_id`; its gated tasks, if it had got
    that far (None otherwise: they are written again)."""
    if (checkpoint_dir(dead.id) / "state.pt").exists():
        os.replace(checkpoint_dir(dead.id), checkpoint_dir(run_id))
    store.update_run(dead.id, progress={"resumed_by": run_id})
    try:
        record = load_dream(dead.id)
    except FileNotFoundError:
        return None
    return record if all("gate" in t for t in record.get("tasks", ())) else None


def _carried_over(record: dict) -> tuple[DreamWriting, GateReport, float]:
    """The writing and gate report of an interrupted run, from its file."""
    tasks = [DreamTask.from_dict(t) for t in record["tasks"]]
    fields = EnvVerdict.__dataclass_fields__
    verdicts = [EnvVerdict(**{k: v for k, v in t["gate"].items() if k in fields})
                for t in record["tasks"]]
    counts = record.get("counts") or {}
    writing = DreamWriting(tasks, [DreamTask.from_dict(t) for t in record.get("dropped", ())],
                           tokens=record.get("tokens", {}).get("writing", 0),
                           units=counts.get("units", 0), no_span=record.get("no_span", []))
    return writing, GateReport(verdicts, record.get("tokens", {}).get("gate", 0)), \
        record.get("dream_seconds", 0.0)


def _dream(store, lm, tenant, session, messages, review, lesson, opts, say, run_id,
           carried: dict | None = None) -> DreamOutcome:
    parent = store.active_adapter(tenant)
    # The active shared adapter, stacked under the tenant's, when the tenant allows sharing.
    shared_paths = shared_below(store, tenant)
    if carried is not None:
        writing, report, seconds = _carried_over(carried)
    else:
        use_adapter(lm, [*shared_paths, parent.path] if parent else (shared_paths or None))
        try:
            writing, report, seconds = dream_session(lm, lesson.context, lesson.title, opts, say)
        finally:
            use_adapter(lm, None)
    verdicts = {v.task: v for v in report.verdicts}
    record = {"run": run_id, "tenant": tenant, "session": session.id, "title": lesson.title,
              "mode": opts.mode, "budget": str(opts.budget), "checker": opts.checker,
              "style": opts.style, "attempts": opts.attempts, "fallback": opts.fallback,
              "counts": writing.counts(), "no_span": writing.no_span,
              "parse_rate": writing.parse_rate, "dream_seconds": seconds,
              "tokens": {"writing": writing.tokens, "gate": report.tokens},
              "tasks": [{**t.to_dict(), "gate": verdicts[t.id].to_dict()} for t in writing.tasks],
              "dropped": [t.to_dict() for t in writing.dropped]}
    if carried is not None:
        record["resumed_from"] = carried["run"]
    _save(run_id, record)
    faults.point("dream-gated")
    passed = [t for t in writing.tasks if verdicts[t.id].passed]
    counts = dict(written=writing.written, parsed=len(writing.model_tasks), passed=len(passed),
                  by_rule=len(writing.rule_tasks))
    store.update_run(run_id, progress={"phase": "gated", **counts,
                                       "file": str(dream_file(run_id))})
    if not passed:
        msg = "no dreamed environment passed the gate: nothing to train on (see `dream show`)"
        store.update_run(run_id, status="done", progress={"phase": "done", "outcome": "nothing"})
        record["outcome"] = {"status": "nothing", "message": msg}
        _save(run_id, record)
        say(msg)
        return DreamOutcome(run_id, "nothing", msg, **counts)
    rng = random.Random(opts.train.seed)
    questions = [t.question for t in passed]
    rng.shuffle(questions)
    n_held = max(1, round(len(questions) * opts.held_out_share)) if len(questions) > 2 else 0
    lesson.held_out = questions[:n_held]
    lesson.probes = questions[n_held:] or questions
    lesson.practice = [PracticePrompt(t.question, "dream", answer=t.answers[0], sentence=t.sentence)
                       for t in passed if t.answers]
    if opts.with_probes:
        # /dream = the practice material consolidation uses, at dreaming's larger budget, plus
        # the checked tasks.
        extra = [p for p in practice_prompts(lm, lesson.context) if p.text not in set(questions)]
        lesson.practice += extra
        lesson.probes += [p.text for p in extra]
    store.update_run(run_id, progress={"phase": "training", "train_prompts": len(lesson.probes),
                                       "held_out": len(lesson.held_out)})
    copts = ConsolidateOptions(method="dream", train=opts.train, opsd=opts.opsd, gate=opts.gate)
    train_ids = set(lesson.probes)
    grpo_tasks = [t for t in passed if t.question in train_ids and verdicts[t.id].spread]
    rule = build_rule(lm, lesson, grpo_tasks, opts, run_id=f"dream-{run_id}")
    approved = (review is not None and review.verdict == "up"
                and session.consolidated_adapter_id is None)
    say(f"training ({opts.mode}) on {len(lesson.probes)} dreamed prompts, budget {opts.budget}; "
        f"{len(lesson.held_out)} held back for the adapter gate")
    outcome: Outcome = train_and_gate(store, lm, tenant, tenant, copts, [session], [lesson],
                                      parent, shared_paths, run_id, say, rule=rule, mark=approved)
    metrics = {**outcome.metrics, "tokens_dream": writing.tokens + report.tokens,
               "dream_seconds": seconds}
    record["outcome"] = {"status": outcome.status, "message": outcome.message,
                         "adapter_version": outcome.adapter.version if outcome.adapter else None,
                         "metrics": metrics}
    _save(run_id, record)
    store.update_run(run_id, progress={"phase": "done", "outcome": outcome.status})
    return DreamOutcome(run_id, outcome.status, outcome.message, **counts,
                        adapter_version=outcome.adapter.version if outcome.adapter else None,
                        metrics=metrics)
