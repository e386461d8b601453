"""Consolidation: a tenant's approved, unconsolidated sessions -> a candidate adapter -> the gate
-> active (sessions marked consolidated) or rejected (with the reason; sessions stay eligible).

A crash leaves the active adapter untouched: the candidate is written atomically and
registered before it is promoted (activated, and its sessions marked consolidated) in one
transaction, and the run row says how far it got. A run whose process died is marked
interrupted by the next consolidation, which resumes its training from the last step's
checkpoint when it is asked for the same work. tests/test_faults.py kills it at each point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from onthejob import config, faults
from onthejob.learn.drift import TRAINING_ANCHORS, AnchorDrift
from onthejob.learn.gate import (
    GateConfig,
    Verdict,
    decide,
    probe_f1,
    reading_accuracy,
    references,
    retention_set,
)
from onthejob.learn.lesson import Lesson, check_fits, context_messages
from onthejob.learn.loop import STUDENT, TrainConfig, Trainer, config_dict, print_progress
from onthejob.learn.notes import Notes
from onthejob.learn.opsd import Opsd, OpsdConfig, steps_for_visits
from onthejob.learn.practice import KINDS, practice_prompts
from onthejob.learn.sft import Sft
from onthejob.model import LoadedModel
from onthejob.model.adapters import activate, detach, save
from onthejob.store import Conflict, Store
from onthejob.store.types import Adapter, Session

log = logging.getLogger(__name__)
METHODS = ("opsd", "sft", "notes")


# The budget: visits per training probe when no fixed step count is asked for, and a cap.
VISITS = 10
MAX_AUTO_STEPS = 600


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
    held_out_share: float = 0.25  # of the answer spans: their model-written question is held back
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
                held_out_share: float = 0.25, seed: int = 0) -> Lesson:
    """A lesson with its practice material (learn/practice.py). Held back for the gate: for
    `held_out_share` of the answer spans, the model's own question ("span"), while their
    rule-made questions train, so the gate asks a known fact in a phrasing training never saw
    and scores the answer against the span."""
    lesson = Lesson(session_id, context)
    check_fits(lm, lesson)
    practice = practice_prompts(lm, context, kinds)
    rng = random.Random(seed)
    spans = sorted({p.answer for p in practice if p.kind == "span"})
    rng.shuffle(spans)
    held = set(spans[:max(1, round(len(spans) * held_out_share))]) if len(spans) > 1 else set()
    lesson.held_out = [p.text for p in practice if p.kind == "span" and p.answer in held]
    if not lesson.held_out and held_out_share > 0:
        # Fewer than two model-written span questions: hold back some of the questions the
        # model wrote per sentence instead (scored against the teacher's answers).
        plain = [p.text for p in practice if p.kind in ("question", "topic")]
        rng.shuffle(plain)
        lesson.held_out = plain[:max(1, round(len(plain) * held_out_share))] if len(plain) > 1 else []
    lesson.practice = practice
    lesson.probes = [p.text for p in practice if p.text not in set(lesson.held_out)]
    return lesson


def build_lessons(lm: LoadedModel, store: Store, sessions: Sequence[Session],
                  opts: ConsolidateOptions) -> list[Lesson]:
    lessons = []
    for s in sessions:
        messages = store.messages(s.tenant, s.id)
        review = store.get_review(s.tenant, s.id)
        lessons.append(lesson_from(lm, s.id, context_messages(messages, review.text if review else ""),
                                   opts.probe_kinds, opts.held_out_share, opts.train.seed))
    return lessons


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


def _cost_estimate(store: Store, opts: ConsolidateOptions) -> str:
    """The time estimate from this store's last finished run of the same method, if any."""
    for run in store.list_runs(kind="consolidate", limit=50):
        rate = run.progress.get("s_per_step")
        if run.params.get("method") == opts.method and isinstance(rate, (int, float)):
            return (f"about {opts.train.steps * rate / 60:.1f} min of training at the "
                    f"{rate:.1f} s/step measured by run {run.id} here, plus the gate's checks")
    return "no earlier run of this method here to estimate the time from"


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
    below = [] if opts.scope == "shared" else _shared_below(store, tenant)
    say(f"consolidating {len(sessions)} session(s) of {tenant if owner else 'shared'} with "
        f"{opts.method}; parent adapter: {f'v{parent.version}' if parent else 'none (base)'}")
    lessons = build_lessons(lm, store, sessions, opts)
    n_probes = sum(len(x.probes) for x in lessons)
    if opts.visits:
        steps = min(steps_for_visits(n_probes, opts.visits, opts.opsd), MAX_AUTO_STEPS)
        opts = replace(opts, train=replace(opts.train, steps=steps))
    say(f"probes: {n_probes} for training, {sum(len(x.held_out) for x in lessons)} held back; "
        f"{opts.train.steps} steps" + (f" (about {opts.visits:g} visits each)" if opts.visits else ""))
    if opts.dry_run:
        per_step = opts.opsd.prompts_per_step * opts.opsd.samples_per_prompt
        shape = (f"{per_step} samples x {opts.opsd.max_new_tokens} tokens"
                 if opts.method == "opsd" else "one batch")
        msg = (f"plan: {opts.train.steps} steps of {shape}, lr {opts.train.lr}; "
               f"{_cost_estimate(store, opts)}. Nothing was trained.")
        say(msg)
        return Outcome("planned", msg, sessions=[s.id for s in sessions])

    params = {"method": opts.method, "scope": opts.scope, "sessions": [s.id for s in sessions],
              "parent": parent.id if parent else None, "train": config_dict(opts.train),
              "opsd": asdict(opts.opsd), "gate": asdict(opts.gate)}
    resumed = _resumable(store, owner, params)
    run = store.create_run("consolidate", owner,
                           params={**params, "resumed_from": resumed.id if resumed else None})
    if resumed is not None:
        os.replace(checkpoint_dir(resumed.id), checkpoint_dir(run.id))
        store.update_run(resumed.id, progress={"resumed_by": run.id})
        say(f"resuming the training of interrupted run {resumed.id} from its last checkpoint")
    try:
        return _train_and_gate(store, lm, tenant, owner, opts, sessions, lessons, parent, below,
                               run.id, say)
    except BaseException as exc:
        store.update_run(run.id, status="failed", error=f"{type(exc).__name__}: {exc}\n"
                         + traceback.format_exc(limit=5))
        raise


def checkpoint_dir(run_id: int):
    return config.home() / "runs" / f"consolidate-{run_id}"


def _resumable(store: Store, owner: str | None, params: dict):
    """The latest interrupted run that did the same work and left a training checkpoint."""
    wanted = json.loads(json.dumps(params, default=str))  # as stored: tuples become lists
    for run in store.list_runs("consolidate", owner, status="interrupted", limit=5):
        same = {k: v for k, v in run.params.items() if k not in ("process", "resumed_from")}
        if same == wanted and (checkpoint_dir(run.id) / "state.pt").exists():
            return run
    return None


def _shared_below(store: Store, tenant: str) -> list[str]:
    shared = store.active_adapter(None, scope="shared")
    allowed = any(t.name == tenant for t in store.shared_tenants())
    return [shared.path] if shared is not None and allowed else []


def _base_reading_file(lm) -> Path | None:
    """Where the base model's reading score is cached: keyed by the model directory, its
    weight files' sizes and times, and the retention set; None for a model with no directory."""
    folder = Path(lm.path)
    if not folder.is_dir():
        return None
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                     for f in folder.glob("*.safetensors"))
    key = json.dumps([str(folder.resolve()), weights, retention_set()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return config.models_dir() / f".reading-{folder.name}-{digest}.json"


def _known_reading(parent, below, lm) -> float | None:
    """The teacher view's in-context reading when it was measured before: the parent's own
    gate measured it after training; the bare base model's is cached beside the models."""
    if parent is not None:
        value = (parent.metrics or {}).get("reading_after")
        return float(value) if value is not None and not below else None
    path = _base_reading_file(lm)
    if below or path is None:
        return None
    try:
        return float(json.loads(path.read_text())["reading"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_base_reading(parent, below, lm, value: float) -> None:
    path = _base_reading_file(lm)
    if parent is None and not below and path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"reading": value, "model": lm.path}))
        os.replace(tmp, path)


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """A rule raises it from `step()` to end training early (its compute budget is spent)."""


def _train_and_gate(store, lm, tenant, owner, opts, sessions, lessons, parent, below, run_id,
                    say, rule=None, mark: bool = True) -> Outcome:
    """Train (with `rule`, default: the method's), gate, register; shared by dreaming.
    `mark=False` leaves the sessions unmarked (dreams of sessions nobody approved)."""
    started = time.time()
    trainer = Trainer(lm, opts.train, parent=parent.path if parent else None, stack_below=below)
    held = [(lesson.context, q) for lesson in lessons for q in lesson.held_out]
    known = {p.text: p.answer for lesson in lessons for p in lesson.practice if p.answer}
    earlier = _earlier_probes(store, parent)
    t0 = time.time()
    say(f"gate, before training: {len(held)} held-back probes ({sum(q in known for _, q in held)} "
        f"with a known answer, the teacher answers the rest), the parent on them, "
        f"{len(earlier)} earlier probes and in-context reading ...")
    with trainer.teacher():
        unknown = [(c, q) for c, q in held if q not in known]
        teacher_refs = iter(references(lm, unknown))
        refs = [known[q] if q in known else next(teacher_refs) for _, q in held]
        before_probe = probe_f1(lm, [q for _, q in held], refs)
        before_earlier = probe_f1(lm, [e["q"] for e in earlier], [e["ref"] for e in earlier])
        before_reading = _known_reading(parent, below, lm)
        if before_reading is None:
            before_reading = reading_accuracy(lm)
            _remember_base_reading(parent, below, lm, before_reading)
    say(f"  probe F1 {before_probe:.3f}, reading {before_reading:.1%} ({time.time() - t0:.0f} s)")
    rule = rule if rule is not None else rule_for(opts, lessons, lm)
    show = print_progress(f"[{opts.method}] ")

    def progress(m: dict) -> None:
        show(m)
        store.update_run(run_id, progress={k: v for k, v in m.items() if isinstance(v, (int, float))})

    try:
        trainer.run(rule, progress=progress, checkpoint=checkpoint_dir(run_id))
    except StopTraining as stop:
        say(f"stopped after {len(trainer.history)} steps: {stop}")
        if not trainer.history:
            raise ValueError("the budget ended training before its first step") from None
    say("gate, after training: held-back probes, earlier probes and reading without context ...")
    with trainer.frozen_student():
        after_probe = probe_f1(lm, [q for _, q in held], refs)
        after_earlier = probe_f1(lm, [e["q"] for e in earlier], [e["ref"] for e in earlier])
        after_reading = reading_accuracy(lm)
    # Drift is measured here, once, not at every step (it was a quarter of each step).
    kl = AnchorDrift()(trainer)
    verdict: Verdict = decide(
        opts.gate, gain=after_probe - before_probe, kl=kl,
        retention_drop=before_reading - after_reading,
        earlier_drop=(before_earlier - after_earlier) if earlier else 0.0,
        extra={"probe_f1_before": before_probe, "probe_f1_after": after_probe,
               "reading_before": before_reading, "reading_after": after_reading,
               "seconds": time.time() - started,
               "peak_rss_mb": _peak_rss_mb(),
               "tokens_student": getattr(rule, "tokens_student", 0),
               "tokens_teacher": getattr(rule, "tokens_teacher", 0),
               "held_out": [{"q": q, "ref": r} for (_, q), r in zip(held, refs, strict=True)],
               "steps": len(trainer.history), "lr": opts.train.lr,
               "teacher_rows": dict(getattr(rule, "counts", {})),
               "training_probes": [q for lesson in lessons for q in lesson.probes]})
    version = store.next_adapter_version(opts.scope, owner)
    where = config.adapters_dir() / opts.scope / (owner or "shared") / f"v{version}"
    if where.exists():  # written by a run killed before registering it: never served, set aside
        os.replace(where, where.with_name(f"{where.name}.unregistered-{int(time.time())}"))
    digest = save(lm.model, STUDENT, where, meta={"method": opts.method, "run": run_id,
                                                   "sessions": [s.id for s in sessions]})
    faults.point("adapter-saved")
    adapter = store.add_adapter(opts.scope, owner, method=opts.method, path=str(where),
                                checksum=digest, parent_id=parent.id if parent else None,
                                version=version, metrics=verdict.metrics,
                                status="candidate", reason=verdict.reason)
    faults.point("candidate-registered")
    status, reason = ("promoted", verdict.reason) if verdict.promote else ("rejected", verdict.reason)
    if verdict.promote:
        by_tenant: dict[str, list[str]] = {}
        for s in sessions if mark else ():
            by_tenant.setdefault(s.tenant, []).append(s.id)
        try:
            adapter = store.promote_adapter(adapter.id, by_tenant, reason=verdict.reason)
            faults.point("promoted")
        except Conflict as exc:  # e.g. a review turned thumbs-down while it trained
            status, reason = "rejected", f"not promoted: {exc}"
    if status == "rejected":
        adapter = store.set_adapter_status(adapter.id, "rejected", reason)
    store.update_run(run_id, status="done", progress={"outcome": status, "adapter": adapter.id})
    # Leave the model as the server would serve it: training adapters removed.
    for name in (STUDENT, "teacher", *[f"below{i}" for i in range(len(below))]):
        detach(lm, name)
    activate(lm, None)
    torch.set_grad_enabled(True)
    say(f"{status}: adapter v{adapter.version} ({reason})")
    return Outcome(status, reason, adapter, run_id, [s.id for s in sessions],
                   verdict.metrics)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
