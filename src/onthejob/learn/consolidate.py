"""Consolidation: a tenant's approved, unconsolidated sessions -> a candidate adapter -> the gate
-> active (sessions marked consolidated) or rejected (with the reason; sessions stay eligible).

A crash leaves the active adapter untouched: the candidate is written atomically and
registered before it is promoted (activated, and its sessions marked consolidated) in one
transaction, and the run row says how far it got. A run whose process died is marked
interrupted by the next consolidation, which resumes its training from the last step's
checkpoint when it is asked for the same work. tests/test_faults.py kills it at each point.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from onthejob import config, faults
from onthejob.learn.drift import TRAINING_ANCHORS, AnchorDrift
from onthejob.learn.estimate import estimate
from onthejob.learn.gate import (
    GateConfig,
    Verdict,
    decide,
    gate_general_set,
    general_accuracy,
    probe_f1,
    reading_accuracy,
    references,
    retention_set,
)
from onthejob.learn.lesson import Lesson, check_fits, kept_answers, teacher_context
from onthejob.learn.loop import STUDENT, TrainConfig, Trainer, config_dict, print_progress
from onthejob.learn.notes import Notes
from onthejob.learn.opsd import Opsd, OpsdConfig, planned_probes, steps_for_visits
from onthejob.learn.practice import (
    BARE_PHRASES,
    KINDS,
    PHRASES_PER_SENTENCE,
    SPAN_PHRASINGS,
    PracticePrompt,
    practice_prompts,
)
from onthejob.learn.sft import Sft
from onthejob.model import LoadedModel
from onthejob.model.adapters import activate, detach, save
from onthejob.store import Conflict, Store
from onthejob.store.types import Adapter, Session

log = logging.getLogger(__name__)
METHODS = ("opsd", "sft", "notes")


# The budget: visits per training probe when no fixed step count is asked for, and a cap.
# 5: on dev articles 5-14 (10 sessions together) 10 visits transferred no more than 5 (0.364
# both) at twice the general drop (16.7 against 8.3 pts) and twice the training time
# (docs/RESULTS.md, "The student does not fit its own lessons"); the benchmarks run at 5.
VISITS = 5
MAX_AUTO_STEPS = 600
MIN_HELD_OUT = 2  # held-back probes per session at least, where the practice material has them


def recommended_opsd() -> OpsdConfig:
    """The OPSD recipe (docs/RESULTS.md, the ablation): rows the teacher answered once with
    the session in context (greedy and one sample, answers that miss a known span dropped),
    forward KL on the teacher's top-32, 16 rows a step, a quarter of them anchors held to the
    base model."""
    return OpsdConfig()


@dataclass
class ConsolidateOptions:
    method: str = "opsd"
    scope: str = "tenant"
    session_ids: Sequence[str] = ()
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, lr=1e-3))
    # When set, train.steps becomes what gives every training probe this many visits
    # (capped at MAX_AUTO_STEPS); None: train.steps as given.
    visits: float | None = VISITS
    opsd: OpsdConfig = field(default_factory=recommended_opsd)
    gate: GateConfig = field(default_factory=GateConfig)
    probe_kinds: Sequence[str] = KINDS
    span_phrasings: int = SPAN_PHRASINGS  # the model's questions per answer span
    bare_phrases: int = BARE_PHRASES  # noun phrases asked of a sentence with no name or number
    held_out_share: float = 0.25  # of the answer spans: their model-written question is held back
    # (at least MIN_HELD_OUT probes, so that the gate's learn check is not one question)
    dry_run: bool = False


@dataclass
class Outcome:
    status: str  # "nothing", "planned", "promoted", "rejected", "failed"
    message: str
    adapter: Adapter | None = None
    run_id: int | None = None
    sessions: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def lesson_from(lm: LoadedModel, session_id: str, context: list, kinds: Sequence[str] = KINDS,
                held_out_share: float = 0.25, seed: int = 0,
                kept: dict[int, bytes] | None = None,
                phrases_per_sentence: int = PHRASES_PER_SENTENCE,
                span_phrasings: int = SPAN_PHRASINGS, bare_phrases: int = BARE_PHRASES) -> Lesson:
    """A lesson with its practice material (learn/practice.py). Held back for the gate: for
    `held_out_share` of the answer spans, the model's own question ("span"), while their
    rule-made questions train, so the gate asks a known fact in a phrasing training never saw
    and scores the answer against the span. `kept`: the context's answers' kept log-probs
    (learn/lesson.py `kept_answers`)."""
    lesson = Lesson(session_id, context, kept=dict(kept or {}))
    check_fits(lm, lesson)
    practice = practice_prompts(lm, context, kinds, phrases_per_sentence=phrases_per_sentence,
                                span_phrasings_per_span=span_phrasings, bare_phrases=bare_phrases)
    rng = random.Random(seed)
    spans = sorted({p.answer for p in practice if p.kind == "span"})
    rng.shuffle(spans)
    want = max(MIN_HELD_OUT, round(len(spans) * held_out_share)) if held_out_share > 0 else 0
    # A span's model-written question may be held back even when it is the only one: the
    # span's rule-made question still trains, so the fact is still taught.
    held = set(spans[:want])
    lesson.held_out = [p.text for p in practice if p.kind == "span" and p.answer in held]
    if len(held) < want:
        # Too few model-written span questions: top up with the questions the model wrote
        # per sentence (scored against the teacher's answers), leaving at least one to train.
        plain = [p.text for p in practice if p.kind in ("question", "topic")]
        rng.shuffle(plain)
        lesson.held_out += plain[:min(want - len(held), len(plain) - 1)]
    lesson.practice = practice
    lesson.probes = [p.text for p in practice if p.text not in set(lesson.held_out)]
    return lesson


def build_lessons(lm: LoadedModel, store: Store, sessions: Sequence[Session],
                  opts: ConsolidateOptions, say: Callable[[str], None] | None = None,
                  observe: Callable[[dict], None] | None = None,
                  served_with: Sequence[str] | None = None) -> list[Lesson]:
    """Each session's lesson with its practice material and its answers' kept log-probs
    (those served with the adapters `served_with`, the teacher's; None: any); a line (and
    `observe`) per session."""
    lessons, started = [], time.time()
    for n, s in enumerate(sessions, 1):
        messages = store.messages(s.tenant, s.id)
        review = store.get_review(s.tenant, s.id)
        kept, stale = kept_answers(messages, store.kept_logprobs(s.tenant, s.id), served_with)
        words = review.text if review else ""
        lessons.append(lesson_from(lm, s.id, teacher_context(messages, words),
                                   opts.probe_kinds, opts.held_out_share, opts.train.seed, kept,
                                   span_phrasings=opts.span_phrasings,
                                   bare_phrases=opts.bare_phrases))
        lessons[-1].review = words
        elapsed = time.time() - started
        eta = elapsed / n * (len(sessions) - n)
        if say is not None:
            say(f"  practice material: session {n}/{len(sessions)} ({s.id}): "
                f"{len(lessons[-1].probes)} prompts, {len(lessons[-1].held_out)} held back, "
                f"{len(kept)} answers with kept log-probs"
                + (f" ({stale} more served with other adapters, not reused)" if stale else "")
                + f" | {elapsed / n:.0f} s/session, ETA {eta:.0f} s")
        if observe is not None:
            observe({"what": "practice material", "unit": "sessions", "done": n,
                     "total": len(sessions), "eta_s": round(eta, 1)})
    return lessons


def lessons_to_json(lessons: Sequence[Lesson]) -> list[dict]:
    """Lessons as JSON data (kept log-probs in base64), for a resumed run."""
    out = []
    for lesson in lessons:
        row = asdict(lesson)
        row["kept"] = {str(i): base64.b64encode(data).decode("ascii")
                       for i, data in lesson.kept.items()}
        out.append(row)
    return out


def lessons_from_json(rows: Sequence[dict]) -> list[Lesson]:
    return [Lesson(**{**row, "practice": [PracticePrompt(**p) for p in row.get("practice", [])],
                      "kept": {int(i): base64.b64decode(data)
                               for i, data in (row.get("kept") or {}).items()}})
            for row in rows]


class Phases:
    """Each phase of a run said as it starts and as it ends (with its seconds), and kept in the
    run's row with live progress inside it, so a job runner's log and `onthejob runs show`
    both show where a nightly consolidation is."""

    def __init__(self, store: Store, run_id: int, say: Callable[[str], None]):
        self.store, self.run_id, self.say = store, run_id, say
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def start(self, name: str, detail: str = "") -> None:
        self._started[name] = time.time()
        self.say(f"phase {name}: started" + (f" ({detail})" if detail else ""))
        self.store.update_run(self.run_id, progress={"phase": name, "phase_progress": {}})

    def end(self, name: str) -> None:
        self.seconds[name] = time.time() - self._started.pop(name)
        self.store.update_run(self.run_id, progress={"phases": dict(self.seconds)})
        self.say(f"phase {name}: done in {self.seconds[name]:.0f} s")

    @contextmanager
    def __call__(self, name: str, detail: str = ""):
        self.start(name, detail)
        yield
        self.end(name)

    def observe(self, info: dict) -> None:
        """Live progress inside the current phase (done, total, rate, ETA)."""
        self.store.update_run(self.run_id, progress={"phase_progress": info})


def rule_for(opts: ConsolidateOptions, lessons: Sequence[Lesson], lm: LoadedModel):
    if opts.method == "opsd":
        return Opsd(lessons, list(TRAINING_ANCHORS), opts.opsd)
    if opts.method == "sft":
        return Sft(lessons, lm.tokenizer)
    if opts.method == "notes":
        return Notes(lessons)
    raise ValueError(f"unknown method {opts.method!r}; choose one of {', '.join(METHODS)}")


def _eligible(store: Store, tenant: str, opts: ConsolidateOptions) -> list[Session]:
    if opts.scope == "shared":
        sessions = [s for t in store.shared_tenants() for s in store.sessions_to_consolidate(t)]
    else:
        sessions = store.sessions_to_consolidate(tenant)
    if opts.session_ids:
        wanted = set(opts.session_ids)
        unknown = wanted - {s.id for s in sessions}
        if unknown:
            raise ValueError(f"not eligible (unknown, foreign, not approved or already "
                             f"consolidated): {', '.join(sorted(unknown))}")
        sessions = [s for s in sessions if s.id in wanted]
    return sessions


def _earlier_probes(store: Store, parent: Adapter | None) -> list[dict]:
    out, seen = [], 0
    while parent is not None and seen < 20:
        out += parent.metrics.get("held_out", [])
        seen += 1
        parent = store.get_adapter(parent.parent_id) if parent.parent_id else None
    return out[:24]


def consolidate(store: Store, lm: LoadedModel, tenant: str, opts: ConsolidateOptions,
                say: Callable[[str], None] = print) -> Outcome:
    if opts.method not in METHODS:
        raise ValueError(f"unknown method {opts.method!r}; choose one of {', '.join(METHODS)}")
    store.get_tenant(tenant)  # a clear NotFound for an unknown tenant
    for dead in store.interrupt_dead_runs():
        say(f"run {dead.id} ({dead.kind}) had stopped mid-way; marked interrupted")
    sessions = _eligible(store, tenant, opts)
    if not sessions:
        return Outcome("nothing", "no approved, unconsolidated sessions: review sessions with "
                       "/review up (or POST /v1/sessions/{id}/review) first")
    owner = None if opts.scope == "shared" else tenant
    parent = store.active_adapter(owner, scope=opts.scope)
    below = [] if opts.scope == "shared" else shared_below(store, tenant)
    say(f"consolidating {len(sessions)} session(s) of {tenant if owner else 'shared'} with "
        f"{opts.method}; parent adapter: {f'v{parent.version}' if parent else 'none (base)'}")
    if opts.dry_run:
        plan = estimate(store, lm, sessions, opts)
        say(plan.text)
        return Outcome("planned", plan.text, sessions=[s.id for s in sessions],
                       metrics={"estimate_s": plan.seconds, "estimate": plan.parts})

    params = {"method": opts.method, "scope": opts.scope, "sessions": [s.id for s in sessions],
              "parent": parent.id if parent else None, "train": config_dict(opts.train),
              "visits": opts.visits, "opsd": asdict(opts.opsd), "gate": asdict(opts.gate)}
    resumed = _resumable(store, owner, params)
    run = store.create_run("consolidate", owner,
                           params={**params, "resumed_from": resumed.id if resumed else None})
    if resumed is not None:
        os.replace(checkpoint_dir(resumed.id), checkpoint_dir(run.id))
        store.update_run(resumed.id, progress={"resumed_by": run.id})
        say(f"resuming interrupted run {resumed.id}: its practice material, gate measures and "
            "training checkpoint are reused where it had them")
    say(f"run {run.id} (`onthejob runs show {run.id}` shows its progress)")
    phases = Phases(store, run.id, say)
    try:
        saved = checkpoint_dir(run.id) / "lessons.json"
        with phases("practice material", f"{len(sessions)} session(s)"):
            if saved.exists():
                lessons = lessons_from_json(json.loads(saved.read_text()))
                say("  reused the interrupted run's practice material")
            else:
                teacher = [*below, parent.path] if parent else list(below)
                lessons = build_lessons(lm, store, sessions, opts, say, phases.observe,
                                        served_with=teacher)
                write_json(saved, lessons_to_json(lessons))
        n_probes = planned_probes(lessons, opts.opsd) if opts.method == "opsd" else \
            sum(len(x.probes) for x in lessons)
        if opts.visits:
            steps = min(steps_for_visits(n_probes, opts.visits, opts.opsd), MAX_AUTO_STEPS)
            opts = replace(opts, train=replace(opts.train, steps=steps))
        say(f"probes: {n_probes} for training, {sum(len(x.held_out) for x in lessons)} held back; "
            f"{opts.train.steps} steps" + (f" (about {opts.visits:g} visits each)" if opts.visits else ""))
        return train_and_gate(store, lm, tenant, owner, opts, sessions, lessons, parent, below,
                              run.id, say, phases=phases)
    except BaseException as exc:
        store.update_run(run.id, status="failed", error=f"{type(exc).__name__}: {exc}\n"
                         + traceback.format_exc(limit=5))
        raise


def write_json(path: Path, value) -> None:
    """Write JSON atomically (a crash leaves the old file or none, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, default=str))
    os.replace(tmp, path)


def checkpoint_dir(run_id: int):
    return config.home() / "runs" / f"consolidate-{run_id}"


def _resumable(store: Store, owner: str | None, params: dict):
    """The latest interrupted run that did the same work and left something to reuse: its
    practice material, its gate measures or a training checkpoint."""
    wanted = json.loads(json.dumps(params, default=str))  # as stored: tuples become lists
    for run in store.list_runs("consolidate", owner, status="interrupted", limit=5):
        same = {k: v for k, v in run.params.items() if k not in ("process", "resumed_from")}
        if same == wanted and any((checkpoint_dir(run.id) / f).exists()
                                  for f in ("state.pt", "lessons.json", "gate-before.json")):
            return run
    return None


def shared_below(store: Store, tenant: str) -> list[str]:
    shared = store.active_adapter(None, scope="shared")
    allowed = any(t.name == tenant for t in store.shared_tenants())
    return [shared.path] if shared is not None and allowed else []


def _base_measures_file(lm) -> Path | None:
    """Where the base model's reading and general-question scores are cached: keyed by the
    model directory, its weight files' sizes and times, and both item sets; None for a model
    with no directory."""
    folder = Path(lm.path)
    if not folder.is_dir():
        return None
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                     for f in folder.glob("*.safetensors"))
    key = json.dumps([str(folder.resolve()), weights, retention_set(), gate_general_set()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return config.models_dir() / f".gate-base-{folder.name}-{digest}.json"


def _known_measures(parent, below, lm) -> dict:
    """The teacher view's reading and general scores where they were measured before: the
    parent's own gate measured them after its training; the bare base model's are cached
    beside the models. Missing keys are measured."""
    if below:
        return {}
    if parent is not None:
        m = parent.metrics or {}
        return {k: float(m[f"{k}_after"]) for k in ("reading", "general")
                if m.get(f"{k}_after") is not None}
    path = _base_measures_file(lm)
    try:
        saved = json.loads(path.read_text()) if path is not None else {}
        return {k: float(saved[k]) for k in ("reading", "general") if k in saved}
    except (OSError, ValueError, TypeError):
        return {}


def _remember_base_measures(parent, below, lm, values: dict) -> None:
    path = _base_measures_file(lm)
    if parent is None and not below and path is not None:
        write_json(path, {**values, "model": lm.path})


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """A rule raises it from `step()` to end training early (its compute budget is spent)."""


def _gate_before(lm, trainer, run_id, held, known, earlier, parent, below) -> dict:
    """The gate's measures of the teacher view (the parent) before training, saved beside the
    run's checkpoint so that a resumed run does not measure them again."""
    path = checkpoint_dir(run_id) / "gate-before.json"
    questions = [q for _, q in held]
    try:
        saved = json.loads(path.read_text())
        if saved.get("questions") == questions:
            return {**saved, "reused": True}
    except (OSError, ValueError):
        pass
    with trainer.teacher():
        unknown = [(c, q) for c, q in held if q not in known]
        teacher_refs = iter(references(lm, unknown))
        refs = [known[q] if q in known else next(teacher_refs) for _, q in held]
        out = {"questions": questions, "refs": refs,
               "probe": probe_f1(lm, questions, refs),
               "earlier": probe_f1(lm, [e["q"] for e in earlier], [e["ref"] for e in earlier]),
               **_known_measures(parent, below, lm)}
        if "reading" not in out:
            out["reading"] = reading_accuracy(lm)
        if "general" not in out:
            out["general"] = general_accuracy(lm, gate_general_set())
    _remember_base_measures(parent, below, lm, {"reading": out["reading"], "general": out["general"]})
    write_json(path, out)
    return out


def train_and_gate(store: Store, lm: LoadedModel, tenant: str, owner: str | None,
                   opts: ConsolidateOptions, sessions: Sequence[Session], lessons: Sequence[Lesson],
                   parent: Adapter | None, below: Sequence[str], run_id: int,
                   say: Callable[[str], None], rule=None, mark: bool = True,
                   phases: Phases | None = None) -> Outcome:
    """Train (with `rule`, default: the method's), gate, register; shared by dreaming.
    `mark=False` leaves the sessions unmarked (dreams of sessions nobody approved)."""
    started = time.time()
    phases = phases or Phases(store, run_id, say)
    trainer = Trainer(lm, opts.train, parent=parent.path if parent else None, stack_below=below)
    trainer.observer = phases.observe
    held = [(lesson.context, q) for lesson in lessons for q in lesson.held_out]
    known = {p.text: p.answer for lesson in lessons for p in lesson.practice if p.answer}
    earlier = _earlier_probes(store, parent)
    with phases("gate before training", f"{len(held)} held-back probes "
                f"({sum(q in known for _, q in held)} with a known answer, the teacher answers "
                f"the rest), {len(earlier)} earlier probes, reading and general questions"):
        before = _gate_before(lm, trainer, run_id, held, known, earlier, parent, below)
        say(f"  probe F1 {before['probe']:.3f}, reading {before['reading']:.1%}, general "
            f"{before['general']:.1%}" + (" (reused from the interrupted run)"
                                          if before.get("reused") else ""))
    refs = before["refs"]
    rule = rule if rule is not None else rule_for(opts, lessons, lm)
    show = print_progress(f"[{opts.method}] ")

    def progress(m: dict) -> None:
        show(m)
        store.update_run(run_id, progress={k: v for k, v in m.items() if isinstance(v, (int, float))})

    phases.start("teacher answers and anchors", f"{opts.method} prepares its rows")

    def prepared() -> None:
        phases.end("teacher answers and anchors")
        reuse = teacher_reuse(getattr(rule, "counts", {}), getattr(rule, "tokens_teacher", 0))
        if reuse:
            store.update_run(run_id, progress={"teacher_reuse": reuse})
            say(f"  teacher rows: {reuse['reused']} of {reuse['rows']} taken from the store "
                f"({reuse['reused_share']:.1%}), the rest scored; {reuse['tokens_saved']} "
                f"teacher tokens saved ({reuse['scoring_saved_share']:.1%} of the scoring, "
                f"{reuse['tokens_saved_share']:.1%} of all the teacher's preparation)")
        phases.start("training", f"{opts.train.steps} steps")

    try:
        trainer.run(rule, progress=progress, checkpoint=checkpoint_dir(run_id), prepared=prepared)
    except StopTraining as stop:
        say(f"stopped after {len(trainer.history)} steps: {stop}")
        if not trainer.history:
            raise ValueError("the budget ended training before its first step") from None
    phases.end("training")
    with phases("gate after training", "held-back and earlier probes without context, reading, "
                "general questions, KL to the base"):
        with trainer.frozen_student():
            after_probe = probe_f1(lm, [q for _, q in held], refs)
            after_earlier = probe_f1(lm, [e["q"] for e in earlier], [e["ref"] for e in earlier])
            after_reading = reading_accuracy(lm)
            after_general = general_accuracy(lm, gate_general_set())
        # Drift is measured here, once, not at every step (it was a quarter of each step).
        kl = AnchorDrift()(trainer)
    by_tenant: dict[str, list[str]] = {}
    for s in sessions if mark else ():
        by_tenant.setdefault(s.tenant, []).append(s.id)
    steps = len(trainer.history)
    verdict: Verdict = decide(
        opts.gate, gain=after_probe - before["probe"], kl=kl,
        retention_drop=before["reading"] - after_reading,
        earlier_drop=(before["earlier"] - after_earlier) if earlier else 0.0,
        general_drop=before["general"] - after_general,
        extra={"probe_f1_before": before["probe"], "probe_f1_after": after_probe,
               "reading_before": before["reading"], "reading_after": after_reading,
               "general_before": before["general"], "general_after": after_general,
               "reading_items": len(retention_set()), "general_items": len(gate_general_set()),
               "seconds": time.time() - started, "phases": dict(phases.seconds),
               "peak_rss_mb": _peak_rss_mb(),
               "tokens_student": getattr(rule, "tokens_student", 0),
               "tokens_teacher": getattr(rule, "tokens_teacher", 0),
               "held_out": [{"q": q, "ref": r} for (_, q), r in zip(held, refs, strict=True)],
               "steps": steps, "lr": opts.train.lr,
               "teacher_rows": dict(getattr(rule, "counts", {})),
               "teacher_reuse": teacher_reuse(getattr(rule, "counts", {}),
                                              getattr(rule, "tokens_teacher", 0)),
               "training_probes": [q for lesson in lessons for q in lesson.probes],
               "self_anchors": list(getattr(rule, "self_written", [])),
               "review_prompts": list(getattr(rule, "review_written", [])),
               "sessions_by_tenant": by_tenant})
    status, reason, adapter = register_candidate(store, lm, opts.scope, owner, opts.method, run_id,
                                                 [s.id for s in sessions], parent, verdict, by_tenant)
    store.update_run(run_id, status="done", progress={
        "outcome": status, "adapter": adapter.id, "phases": dict(phases.seconds),
        "rates": _rates(phases.seconds, lessons, getattr(rule, "counts", {}), steps)})
    # Leave the model as the server would serve it: training adapters removed.
    for name in (STUDENT, "teacher", *[f"below{i}" for i in range(len(below))]):
        detach(lm, name)
    activate(lm, None)
    torch.set_grad_enabled(True)
    say(f"{status}: adapter v{adapter.version} ({reason})")
    return Outcome(status, reason, adapter, run_id, [s.id for s in sessions], verdict.metrics)


def teacher_reuse(counts: dict, tokens_teacher: int) -> dict:
    """How much of the teacher's preparation came from the store (kept log-probs of the
    session's own answers) instead of being computed: rows reused of all teacher rows, and
    teacher tokens saved, of what scoring the rows would have cost and of the whole
    preparation's teacher tokens (answers written and scored; a session's context counted
    for each answer written after it); {} for a rule without teacher rows."""
    reused, scored = counts.get("reused", 0), counts.get("scored", 0)
    if not reused + scored:
        return {}
    saved, scoring = counts.get("teacher_tokens_saved", 0), counts.get("teacher_tokens_scored", 0)
    return {"reused": reused, "rows": reused + scored, "reused_share": reused / (reused + scored),
            "tokens_saved": saved, "tokens_scored": scoring, "tokens_teacher": tokens_teacher,
            "scoring_saved_share": saved / max(saved + scoring, 1),
            "tokens_saved_share": saved / max(saved + tokens_teacher, 1)}


def register_candidate(store: Store, lm: LoadedModel, scope: str, owner: str | None, method: str,
                       run_id: int | str | None, session_ids: Sequence[str], parent: Adapter | None,
                       verdict: Verdict | None, by_tenant: dict[str, list[str]] | None = None,
                       metrics: dict | None = None, reason: str = "", meta: dict | None = None
                       ) -> tuple[str, str, Adapter]:
    """The one way an adapter enters the registry (consolidation, dreaming, grinding): the
    student's weights written atomically under the next version (a folder a killed run left
    there is set aside, never served), registered as a candidate with its metrics, then, with
    a gate's `verdict`, promoted (its sessions marked consolidated, in one transaction) or
    rejected with the reason; without one (a grind) it stays a candidate for a person to
    activate. Returns (status, reason, adapter)."""
    version = store.next_adapter_version(scope, owner)
    where = config.adapters_dir() / scope / (owner or "shared") / f"v{version}"
    if where.exists():  # written by a run killed before registering it: never served, set aside
        os.replace(where, where.with_name(f"{where.name}.unregistered-{int(time.time())}"))
    digest = save(lm.model, STUDENT, where, meta={"method": method, "run": run_id,
                                                   "sessions": list(session_ids), **(meta or {})})
    faults.point("adapter-saved")
    metrics = dict(metrics if metrics is not None else verdict.metrics if verdict else {})
    if verdict is not None:
        metrics["gate"] = {"promote": verdict.promote, "reason": verdict.reason}
        reason = verdict.reason
    adapter = store.add_adapter(scope, owner, method=method, path=str(where), checksum=digest,
                                parent_id=parent.id if parent else None, version=version,
                                metrics=metrics, status="candidate", reason=reason)
    faults.point("candidate-registered")
    if verdict is None:
        return "candidate", reason, adapter
    status = "promoted" if verdict.promote else "rejected"
    if verdict.promote:
        try:
            adapter = store.promote_adapter(adapter.id, by_tenant or {}, reason=verdict.reason)
            faults.point("promoted")
        except Conflict as exc:  # e.g. a review turned thumbs-down while it trained
            status, reason = "rejected", f"not promoted: {exc}"
    if status == "rejected":
        adapter = store.set_adapter_status(adapter.id, "rejected", reason)
    return status, reason, adapter


def _rates(seconds: dict, lessons: Sequence[Lesson], counts: dict, steps: int) -> dict:
    """What this run measured per unit of work, for the next dry run's estimate."""
    prompts = sum(len(x.probes) + len(x.held_out) for x in lessons)
    out = {}
    if seconds.get("practice material") and prompts:
        out["practice_s_per_prompt"] = seconds["practice material"] / prompts
    if seconds.get("teacher answers and anchors") and counts.get("teacher_answers"):
        out["teacher_s_per_answer"] = seconds["teacher answers and anchors"] / counts["teacher_answers"]
    if "training" in seconds and steps:
        out["s_per_step"] = seconds["training"] / steps
    if seconds.get("gate after training"):
        out["gate_after_s"] = seconds["gate after training"]
    return out


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
