"""The knowledge-transfer benchmark (SQuAD passages as co-work sessions); protocol in
docs/BENCHMARKS.md, split fixed by ../shared/data/README.md.

Each article is one co-work session: the user pastes the passage as notes for their work and
asks what stands out; the model answers (its own greedy answer, with the notes in front of
it); the user asks it to keep the notes in mind, and the model's short reply is scripted.
The practice material is made from those turns alone (learn/practice.py; the title is not
given to it), and no evaluation question may appear in it (asserted). The questions are
asked without the session (base), with it in context (the ceiling), and without it after
consolidating the session into an adapter; scored by containment, exact match and token F1.
Methods: opsd (consolidation's recipe) and its ablation variants (OPSD_VARIANTS), sft,
notes, dream (practice material plus the dream writer's own questions at twice the visits)
and compact (no training: the questions are asked with the model's summary in context).
Parts:
  - independent: each session consolidated from the base, per method and seed;
    transfer ratio = (after - base) / (in-context - base), pooled over the questions;
  - sweep: the same at other learning rates (sft, opsd; first seed): gain vs forgetting;
  - sequential: sessions consolidated one after another into one adapter, each version the
    child of the last (as `onthejob consolidate` does); after each, accuracy on every earlier
    session's questions: the retention curve;
  - joint: the first N sessions consolidated together into one adapter per method (as
    `onthejob consolidate` does with a tenant's batch of approved sessions);
  - forgetting (every adapter): in-context reading on articles 1000+, general questions the
    base answers right, KL to the base on ordinary prompts; cost: wall time, tokens, peak
    memory, adapter bytes vs the session's KV-cache bytes.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from onthejob.bench.measures import (
    PeakMemory,
    adapter_bytes,
    general_right,
    kv_cache_bytes,
    reading_prompt,
    reading_set,
)
from onthejob.learn.consolidate import lesson_from
from onthejob.learn.drift import TRAINING_ANCHORS, AnchorDrift
from onthejob.learn.evaluate import ANSWER_HINT, QaResult, answer, f1
from onthejob.learn.gate import general_set
from onthejob.learn.lesson import Lesson
from onthejob.learn.loop import STUDENT, TrainConfig, Trainer, print_progress
from onthejob.learn.notes import Notes
from onthejob.learn.opsd import Opsd, OpsdConfig, steps_for_visits
from onthejob.learn.practice import (
    BARE_PHRASES,
    KINDS,
    PHRASES_PER_SENTENCE,
    SPAN_PHRASINGS,
    PracticePrompt,
    assert_unseen,
    covered,
    without,
)
from onthejob.learn.probes import probe_quality
from onthejob.learn.sft import Sft
from onthejob.model import LoadedModel, SamplingParams, generate, load_model, render_ids
from onthejob.model.adapters import save
from onthejob.model.decoder import native_bf16

# dev and test as ../shared/data/README.md fixes them; "extra": the articles no split uses
# (400-999, before the retention probes' 1000+), for development on kinds of text the dev split
# lacks: its four subjects all name a person, place or number in nearly every sentence, while
# the test split's "Computational complexity theory" and "Teacher" seldom do (the extra range
# has such subjects too: "Steam engine" 574-619, "Oxygen" 620-662, "Geology" 911-935).
SPLITS = {"dev": (0, 200), "test": (200, 400), "extra": (400, 1000)}
# The ablation of the learning rule (issue 13): what each variant changes in OpsdConfig.
OPSD_VARIANTS = {
    "opsd": {},  # (a) teacher-answered rows, forward KL on the teacher's top-k
    "opsd-onpolicy-fkl": {"teacher_mix": 0.0, "divergence": "forward_kl"},  # (b) as SDFT
    "opsd-onpolicy-rkl": {"teacher_mix": 0.0, "divergence": "reverse_kl"},  # (c)
    "opsd-then-onpolicy": {"on_policy_from": 0.5},  # (d) (a) for half the steps, then (b)
    # Against forgetting: more of each step's rows are anchors held to the base (0.25 default).
    "opsd-anchors-0.4": {"anchor_share": 0.4},
    # In rounds (--rounds): the base model reads each new session, not the parent version.
    "opsd-base-teacher": {"teacher_from": "base"},
    # In rounds: each round a fresh adapter stacked on the earlier rounds' frozen ones (their
    # weights cannot be overwritten), instead of a child that continues the parent's weights.
    "opsd-stacked": {},
}
STACKED = ("opsd-stacked",)  # methods whose rounds stack fresh adapters (see _joint)
METHODS = (*OPSD_VARIANTS, "sft", "notes", "dream", "compact")
TRAINED = tuple(m for m in METHODS if m != "compact")
SWEEP_METHODS = ("sft", "opsd")


@dataclass
class KnowledgeConfig:
    data: str
    split: str = "test"
    first: int = 0  # skip this many articles of the split
    stride: int = 1  # then take every stride-th article (5: a sample across the split's subjects)
    sessions: int = 4  # independent part: articles, each consolidated from the base
    methods: Sequence[str] = ("opsd", "sft", "notes")
    steps: int = 20  # used when visits is None
    visits: float | None = 8.0  # the budget: visits per practice prompt (steps follow from it)
    lr: float = 1e-3
    lr_schedule: str = "constant"  # learn/loop.py LR_SCHEDULES
    seed: int = 0
    seeds: int = 1  # seed, seed + 1, ...
    max_questions: int = 15
    sequential: int = 0  # sessions consolidated one after another (0: no sequential part)
    sequential_methods: Sequence[str] = ("opsd",)
    joint: int = 0  # sessions consolidated together into one adapter per method (0: no joint part)
    joint_steps: int | None = None  # steps of each joint training (None: steps)
    rounds: int = 1  # the joint sessions in this many consecutive batches, each a child version
    notes_per_session: int = 4
    lrs: Sequence[float] = ()  # extra learning rates for sft and opsd (first seed only)
    reading_items: int = 20  # in-context reading items from articles 1000+
    general_items: int | None = None  # general questions (None: all of data/general.json)
    opsd: OpsdConfig = field(default_factory=OpsdConfig)
    notes_tokens: int = 160  # length of each note the notes baseline writes
    practice_kinds: Sequence[str] = KINDS  # learn/practice.py
    phrases_per_sentence: int = PHRASES_PER_SENTENCE  # noun phrases asked per sentence
    span_phrasings: int = SPAN_PHRASINGS  # the model's own questions per answer span
    bare_phrases: int = BARE_PHRASES  # noun phrases asked of a sentence with no name or number
    bf16: bool | None = None  # bf16 autocast for training; None: where it is fast (measures.py)
    model: str | None = None
    device: str = "cpu"


COWORK_ASK = "What stands out to you in these notes?"
COWORK_KEEP = "Good. Keep these notes in mind; I will come back to them later."
COWORK_REPLY = "Understood, I will keep them in mind."  # scripted


def session_for(article: dict, lm: LoadedModel | None = None) -> list[dict]:
    """The article as a co-work session (module docstring). With `lm`, the model's own answer
    to the first turn; without it (tests of the layout only) a scripted one."""
    first = {"role": "user", "content": f"Here are my notes on {article['title']} for our "
                                        f"work:\n\n{article['context']}\n\n{COWORK_ASK}"}
    reply = "The notes are clear."
    if lm is not None:
        prompt = render_ids(lm.tokenizer, [first])
        reply = generate(lm, [prompt], SamplingParams(max_tokens=48))[0].text.strip() or reply
    return [first, {"role": "assistant", "content": reply},
            {"role": "user", "content": COWORK_KEEP}, {"role": "assistant", "content": COWORK_REPLY}]


def load_data(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())


def article_numbers(split: str, n: int, first: int = 0, stride: int = 1) -> list[int]:
    """The data's article numbers a run uses: `n` of the split, from its `first`-th article
    on, every `stride`-th. Never outside the split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}")
    if first < 0 or stride < 1:
        raise ValueError(f"--first must be >= 0 and --stride >= 1 (got {first} and {stride})")
    lo, hi = SPLITS[split]
    return list(range(lo + first, hi, stride))[:max(n, 0)]


def load_articles(path: str | list[dict], split: str, n: int, first: int = 0,
                  stride: int = 1) -> list[dict]:
    """`n` articles of the split (article_numbers); each carries its number as "number"."""
    numbers = article_numbers(split, n, first, stride)
    data = load_data(path) if isinstance(path, str) else path
    articles = [{**data[k], "number": k} for k in numbers if k < len(data)]
    if n > 0 and not articles:
        lo, hi = SPLITS[split]
        raise ValueError(f"no articles in the {split} split ({lo}-{hi - 1}) of the data from "
                         f"its article {first} on")
    return articles


def opsd_variant(method: str, base: OpsdConfig) -> OpsdConfig:
    from dataclasses import replace

    return replace(base, **OPSD_VARIANTS[method])


def _rule(method: str, lessons: Sequence[Lesson], lm: LoadedModel, cfg: KnowledgeConfig,
          questions: Sequence[str] = ()):
    if method in OPSD_VARIANTS:
        return Opsd(lessons, list(TRAINING_ANCHORS), opsd_variant(method, cfg.opsd),
                    avoid=questions)
    if method == "dream":
        return Opsd([_with_dreams(lm, lesson, questions) for lesson in lessons],
                    list(TRAINING_ANCHORS), cfg.opsd, avoid=questions)
    if method == "sft":
        return Sft(lessons, lm.tokenizer)
    if method == "notes":
        return Notes(lessons, notes_per_session=cfg.notes_per_session,
                     max_new_tokens=cfg.notes_tokens)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(TRAINED)}")


def _with_dreams(lm: LoadedModel, lesson: Lesson, questions: Sequence[str]) -> Lesson:
    """The lesson plus the dream writer's questions (dream/tasks.py: the model's own question
    per answer span, retried with samples, rule-made where none parses), each with its span:
    teacher answers that miss the span are dropped, so every kept task is one the teacher
    solves, whether or not the student's samples do (no reward-spread filter: that is GRPO's)."""
    from dataclasses import replace

    from onthejob.dream.tasks import write_tasks
    from onthejob.learn.practice import material

    writing = write_tasks(lm, material(lesson.context), max_tasks=48, seed=1)
    known = {p.text for p in lesson.practice}
    dreamed = without([PracticePrompt(t.question, "dream", answer=t.answers[0], sentence=t.sentence)
                       for t in writing.tasks if t.answers and t.question not in known], questions)
    assert_unseen(questions, [p.text for p in dreamed])
    return replace(lesson, probes=[*lesson.probes, *(p.text for p in dreamed)],
                   practice=[*lesson.practice, *dreamed])


@dataclass
class Session:
    """One article as a session, with what is measured once (it does not depend on training)."""

    index: int
    title: str
    context: list[dict]
    questions: list[str]
    golds: list[str]
    probes: list[str]
    practice: list[PracticePrompt]
    coverage: float
    probe_quality: dict
    base: QaResult
    in_context: QaResult
    context_tokens: int
    probe_seconds: float
    covered: list[bool] = field(default_factory=list)  # per question: the material asks its fact
    number: int = -1  # the article's number in the data

    def lesson(self) -> Lesson:
        return Lesson(f"article-{self.index}", self.context, list(self.probes),
                      practice=list(self.practice))


class _Clock:
    """Progress over the trainings of the whole run: elapsed, rate and ETA."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.done, self.log = max(total, 1), 0, log
        self.started = time.time()

    def tick(self, text: str) -> None:
        self.done += 1
        elapsed = time.time() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        self.log(f"  [{self.done}/{self.total}] {text} | {elapsed / 60:.1f} min elapsed, "
                 f"{elapsed / self.done:.0f} s/training, ETA {eta / 60:.1f} min")


def run(cfg: KnowledgeConfig, log: Callable[[str], None] = print,
        adapters_dir: str | None = None,
        partial: Callable[[dict], None] | None = None) -> dict:
    """The whole benchmark. `partial`, if given, gets the joint results so far after each
    joint method (a run stopped before its report then still leaves them)."""
    for m in [*cfg.methods, *cfg.sequential_methods]:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    started = time.time()
    data = load_data(cfg.data)
    articles = load_articles(data, cfg.split, max(cfg.sessions, cfg.sequential, cfg.joint),
                             cfg.first, cfg.stride)
    reading_items = reading_set(data, cfg.reading_items)
    general_items = general_set()[: cfg.general_items]
    # The forgetting measure must not ask what the anchors trained on.
    assert_unseen([it["question"] for it in general_items], TRAINING_ANCHORS)
    seeds = [cfg.seed + k for k in range(max(cfg.seeds, 1))]
    sweep_lrs = [lr for lr in dict.fromkeys(cfg.lrs) if lr != cfg.lr]
    n_indep = min(cfg.sessions, len(articles))
    n_seq = min(cfg.sequential, len(articles))
    n_joint = min(cfg.joint, len(articles))
    total = (n_indep * len(cfg.methods) * len(seeds)
             + n_indep * len(sweep_lrs) * sum(m in SWEEP_METHODS for m in cfg.methods)
             + n_seq * len(cfg.sequential_methods) + (len(cfg.methods) if n_joint else 0))
    if "compact" in cfg.methods and (n_indep or n_seq):
        raise ValueError("compact trains nothing: use it in the joint part only (--sessions 0 "
                         "--sequential 0 --joint N)")
    bf16 = native_bf16(cfg.device) if cfg.bf16 is None else cfg.bf16
    budget = f"{cfg.visits:g} visits per practice prompt" if cfg.visits else f"{cfg.steps} steps"
    log(f"{len(articles)} sessions ({cfg.split} split); {total} trainings of {budget} "
        + (f"({cfg.joint_steps} steps for joint ones) " if n_joint and cfg.joint_steps else "") +
        f"({'bf16' if bf16 else 'float32'}): "
        f"independent {n_indep} x {list(cfg.methods)} x seeds {seeds}, sweep lrs {sweep_lrs}, "
        f"sequential {n_seq} x {list(cfg.sequential_methods)}, joint {n_joint} sessions x "
        f"{list(cfg.methods) if n_joint else []}")

    lm = load_model(cfg.model, device=cfg.device)
    sessions = [_measure_session(lm, i, a, cfg, log) for i, a in enumerate(articles)]
    _, forgetting_base = evaluate(lm, [], (reading_items, general_items))
    forgetting_base["kl_to_base"] = 0.0
    # what the base answers of the joint sessions' own training prompts (practice recall's floor)
    base_recall = practice_recall(lm, sessions[:n_joint]) if n_joint else {"prompts": 0}
    log(f"base forgetting probes: reading {forgetting_base['reading']:.1%} "
        f"({len(reading_items)} items), general {forgetting_base['general']:.1%} "
        f"({len(general_items)} questions)")
    dtype_bytes = next(lm.model.parameters()).element_size()
    kv = {s.index: kv_cache_bytes(lm.model.config, s.context_tokens, dtype_bytes) for s in sessions}
    del lm

    clock = _Clock(total, log)
    probes_ctx = (reading_items, general_items)
    runs = []
    for seed in seeds:
        for s in sessions[:n_indep]:
            for method in cfg.methods:
                lrs = [cfg.lr] + (sweep_lrs if method in SWEEP_METHODS and seed == seeds[0] else [])
                for lr in lrs:
                    # Forgetting probes on the first seed only: they cost more than the
                    # session's own questions, and the seeds' spread is about transfer.
                    r = _consolidate_one(cfg, s, method, lr, seed,
                                         probes_ctx if seed == seeds[0] else None, kv[s.index])
                    runs.append(r)
                    clock.tick(f"seed {seed} session {s.index} {method} lr {lr:g}: after "
                               f"{r['after']}/{len(s.questions)} (base {sum(s.base.correct)}, "
                               f"in context {sum(s.in_context.correct)}), KL "
                               f"{r['forgetting']['kl_to_base']:.3f}, {r['cost']['seconds']:.0f} s")
    sequential = {}
    for method in cfg.sequential_methods if n_seq else ():
        sequential[method] = _sequential(cfg, sessions[:n_seq], method, probes_ctx, kv, clock,
                                         adapters_dir)
    joint = {}
    for method in cfg.methods if n_joint else ():
        joint[method] = _joint(cfg, sessions[:n_joint], method, probes_ctx, kv, log,
                               forgetting_base)
        j = joint[method]
        f = j["forgetting"]
        clock.tick(f"joint {method} ({n_joint} sessions): after {sum(j['after'])}/"
                   f"{sum(len(s.questions) for s in sessions[:n_joint])}, reading "
                   f"{f['reading']:.3f} (base {forgetting_base['reading']:.3f}), general "
                   f"{f['general']:.3f} (base {forgetting_base['general']:.3f}), KL "
                   f"{f['kl_to_base']:.3f}, {j['cost']['seconds']:.0f} s")
        if j.get("practice_recall", {}).get("prompts"):
            log(f"    practice recall: {j['practice_recall']['recall']:.3f} of "
                f"{j['practice_recall']['prompts']} training prompts with a known span answered "
                f"without context")
        for name, c in [*by_coverage(sessions[:n_joint], j.get("correct")).items(),
                        *by_fit(sessions[:n_joint], j.get("practice_recall"),
                                j.get("correct")).items()]:
            label = {"fit": "covered, lesson fit,", "unfit": "covered, lesson not fit,"}.get(name, name)
            log(f"    {label} questions ({c['questions']}): base {c['base']:.3f}, in context "
                f"{c['in_context']:.3f}, after {c['after']:.3f}, transfer {c['transfer_ratio']:.3f}")
        if partial is not None:
            partial({"joint": summarize_joint(sessions[:n_joint], joint, forgetting_base),
                     "forgetting_base": forgetting_base})
    result = summarize(cfg, sessions, runs, sequential, forgetting_base, seeds,
                       time.time() - started, n_indep,
                       {"reading_items": len(reading_items), "general_items": len(general_items)})
    result["joint"] = summarize_joint(sessions[:n_joint], joint, forgetting_base)
    if result["joint"]:
        result["joint"]["base_practice_recall"] = base_recall
    return result


def _measure_session(lm: LoadedModel, index: int, article: dict, cfg: KnowledgeConfig,
                     log: Callable[[str], None]) -> Session:
    qs = article["questions"][: cfg.max_questions]
    questions, golds = [q["question"] for q in qs], [q["answer"] for q in qs]
    context = session_for(article, lm)
    base = answer(lm, questions, golds, batch=16)
    ceiling = answer(lm, questions, golds, context=context, batch=8)
    t0 = time.time()
    lesson = lesson_from(lm, f"article-{index}", context, cfg.practice_kinds, held_out_share=0.0,
                         phrases_per_sentence=cfg.phrases_per_sentence,
                         span_phrasings=cfg.span_phrasings, bare_phrases=cfg.bare_phrases)
    probe_s = time.time() - t0
    # No evaluation question may reach training: not as a practice prompt, nor as a turn of
    # the session that is replayed, nor inside the session's own answers used as rows. The
    # model sometimes writes a gold question itself ("Who won the Super Bowl MVP?"): such
    # prompts are dropped and counted, then the rest is checked.
    kept = without(lesson.practice, questions)
    dropped = len(lesson.practice) - len(kept)
    lesson.practice, lesson.probes = kept, [p.text for p in kept]
    assert_unseen(questions, [*lesson.probes, *(p.given for p in lesson.practice if p.given)])
    hits = covered(lesson.practice, golds)
    cover = sum(hits) / len(hits) if hits else float("nan")
    tokens = len(render_ids(lm.tokenizer, context, add_generation_prompt=False))
    log(f"session {index} (article {article.get('number', '?')}) {article['title']}: base {sum(base.correct)}/{len(qs)}, in context "
        f"{sum(ceiling.correct)}/{len(qs)}, {len(lesson.probes)} practice prompts (coverage "
        f"{cover:.0%} of the gold answers; {dropped} dropped: the model wrote an evaluation "
        f"question itself), {tokens} context tokens")
    return Session(index, article["title"], context, questions, golds, lesson.probes,
                   lesson.practice, cover, asdict(probe_quality(lesson.probes, article["context"])),
                   base, ceiling, tokens, probe_s, hits, article.get("number", -1))


def _train(cfg: KnowledgeConfig, lm: LoadedModel, session: Session | Sequence[Session],
           method: str, lr: float, seed: int, parent: str | None = None,
           steps: int | None = None,
           log: Callable[[str], None] | None = None,
           stack_below: Sequence[str] = ()) -> tuple[Trainer, object, dict]:
    """Consolidate one session (or several together) into the student adapter (a child of
    `parent` when given; a fresh one over the frozen `stack_below` adapters when those are)."""
    group = [session] if isinstance(session, Session) else list(session)
    t0 = time.time()
    with PeakMemory(lm.device) as peak:
        bf16 = native_bf16(lm.device) if cfg.bf16 is None else cfg.bf16
        lessons = [s.lesson() for s in group]
        if steps is None and cfg.visits:
            # One budget for every method: the steps that give OPSD's prompts `visits` visits
            # (dream: twice that, over its larger material).
            n = sum(len(x.probes) for x in lessons)
            steps = steps_for_visits(n, cfg.visits * (2 if method == "dream" else 1), cfg.opsd)
        trainer = Trainer(lm, TrainConfig(steps=steps or cfg.steps, lr=lr, seed=seed, bf16=bf16,
                                          lr_schedule=cfg.lr_schedule,
                                          log_every=10), parent=parent,
                          stack_below=stack_below)
        rule = _rule(method, lessons, lm, cfg, [q for s in group for q in s.questions])
        progress = None
        if log is not None:
            progress = print_progress(f"  [{method}] ", write=log)
        history = trainer.run(rule, progress=progress)
        history[-1]["kl_to_base"] = AnchorDrift()(trainer)  # drift measured once, after training
    seconds = time.time() - t0
    probe_s = sum(s.probe_seconds for s in group) if isinstance(rule, Opsd) else 0.0
    cost = {"seconds": seconds + probe_s, "steps": len(history),
            "teacher_rows": dict(getattr(rule, "counts", {})),
            "train_seconds": seconds, "peak_mb": peak.peak_mb, "peak_kind": peak.kind,
            "tokens_student": getattr(rule, "tokens_student", 0),
            "tokens_teacher": getattr(rule, "tokens_teacher", 0)}
    return trainer, history, cost


def evaluate(lm: LoadedModel, sessions: Sequence[Session], probes_ctx=None,
             batch: int = 16) -> tuple[list[QaResult], dict]:
    """No-context answers to the sessions' questions and, with `probes_ctx` (reading items,
    general questions), the forgetting probes: all in one batched pass of greedy decoding."""
    reading_items, general_items = probes_ctx or ([], [])
    questions, golds, spans = [], [], []
    for s in sessions:
        spans.append((len(questions), len(questions) + len(s.questions)))
        questions += s.questions
        golds += s.golds
    r0 = len(questions)
    questions += [reading_prompt(it) for it in reading_items]
    golds += [it["answer"] for it in reading_items]
    g0 = len(questions)
    questions += [it["question"] for it in general_items]
    golds += [it["answers"][0] for it in general_items]
    got = answer(lm, questions, golds, batch=batch) if questions else QaResult([], [], [])
    per_session = [QaResult(got.answers[a:b], got.correct[a:b], got.f1[a:b], got.exact[a:b])
                   for a, b in spans]
    forgetting = {}
    if probes_ctx is not None:
        forgetting["reading"] = _mean([float(c) for c in got.correct[r0:g0]])
        right = general_right(got.answers[g0:], general_items)
        forgetting["general"] = _mean([float(c) for c in right])
        # Each general question with the answer given and whether it counted: what a drop is
        # made of (`general_lost`).
        forgetting["general_answers"] = [[it["question"], a, r] for it, a, r in
                                         zip(general_items, got.answers[g0:], right, strict=True)]
    return per_session, forgetting


def general_lost(before: dict, after: dict) -> list[list[str]]:
    """The general questions answered right before training and wrong after it, each as
    [question, answer before, answer after]."""
    pairs = zip(before.get("general_answers") or [], after.get("general_answers") or [],
                strict=False)
    return [[q, a0, a1] for (q, a0, r0), (_, a1, r1) in pairs if r0 and not r1]


def _kl(history: list) -> float:
    return float(history[-1].get("kl_to_base", 0.0)) if history else 0.0


def _consolidate_one(cfg: KnowledgeConfig, s: Session, method: str, lr: float, seed: int,
                     probes_ctx, kv_bytes: int) -> dict:
    lm = load_model(cfg.model, device=cfg.device)
    trainer, history, cost = _train(cfg, lm, s, method, lr, seed)
    with trainer.frozen_student():
        (after,), forgetting = evaluate(lm, [s], probes_ctx)
    forgetting = {"reading": float("nan"), "general": float("nan"), **forgetting,
                  "kl_to_base": _kl(history)}
    with tempfile.TemporaryDirectory() as tmp:
        save(lm.model, STUDENT, Path(tmp) / "adapter")
        cost["adapter_bytes"] = adapter_bytes(Path(tmp) / "adapter")
    cost["kv_cache_bytes"] = kv_bytes
    return {"seed": seed, "session": s.index, "method": method, "lr": lr,
            "after": sum(after.correct), "after_f1": after.mean_f1, "answers": after.answers,
            "forgetting": forgetting, "cost": cost}


def _sequential(cfg: KnowledgeConfig, sessions: Sequence[Session], method: str, probes_ctx,
                kv: dict[int, int], clock: _Clock, adapters_dir: str | None) -> dict:
    """Consolidate `sessions` in order, each version a child of the last; after each, answer
    every earlier session's questions without context."""
    root = Path(adapters_dir) / method if adapters_dir else Path(tempfile.mkdtemp(prefix="seq-"))
    if root.exists() and adapters_dir:
        shutil.rmtree(root)
    parent: str | None = None
    correct: list[list[int]] = []  # correct[k][j]: after k+1 sessions, session j (j <= k)
    f1s: list[list[float]] = []
    costs, versions = [], []
    forgetting: dict = {}
    try:
        for k, s in enumerate(sessions):
            lm = load_model(cfg.model, device=cfg.device)
            trainer, history, cost = _train(cfg, lm, s, method, cfg.lr, cfg.seed, parent=parent)
            last = k == len(sessions) - 1
            with trainer.frozen_student():
                got, forgetting = evaluate(lm, sessions[: k + 1], probes_ctx if last else None)
            row_c = [sum(g.correct) for g in got]
            row_f = [g.mean_f1 for g in got]
            where = root / f"v{k + 1}"
            save(lm.model, STUDENT, where, meta={"method": method, "parent": parent,
                                                 "session": s.index, "bench": "knowledge"})
            cost["adapter_bytes"] = adapter_bytes(where)
            cost["kv_cache_bytes"] = kv[s.index]
            cost["kl_to_base"] = _kl(history)
            if last:
                forgetting["kl_to_base"] = cost["kl_to_base"]
            correct.append(row_c)
            f1s.append(row_f)
            costs.append(cost)
            versions.append({"version": k + 1, "parent": k or None, "session": s.index})
            parent = str(where)
            clock.tick(f"sequential {method} v{k + 1} (session {s.index}): on sessions so far "
                       f"{sum(row_c)}/{sum(len(e.questions) for e in sessions[:k + 1])}, "
                       f"KL {cost['kl_to_base']:.3f}")
    finally:
        if not adapters_dir:
            shutil.rmtree(root, ignore_errors=True)
    return {"correct": correct, "f1": f1s, "cost": costs, "versions": versions,
            "forgetting": forgetting, "adapters": str(root) if adapters_dir else None}


def _compact_joint(cfg: KnowledgeConfig, sessions: Sequence[Session], forgetting_base: dict,
                   kv: dict[int, int]) -> dict:
    """No training: each session's questions asked with the model's summary of the session
    (the server's /compact) as the only context. The weights do not change, so forgetting is
    the base's by construction."""
    from onthejob.serve.turns import COMPACT_INSTRUCTION
    from onthejob.store.context import SUMMARY_HEADER

    lm = load_model(cfg.model, device=cfg.device)
    t0 = time.time()
    got, summaries, tokens = [], [], 0
    for s in sessions:
        prompt = render_ids(lm.tokenizer, [*s.context, {"role": "user", "content": COMPACT_INSTRUCTION}])
        summary = generate(lm, [prompt], SamplingParams(max_tokens=256))[0]
        tokens += len(prompt) + len(summary.token_ids)
        summaries.append(summary.text.strip())
        got.append(answer(lm, s.questions, s.golds, batch=8, context=[
            {"role": "system", "content": SUMMARY_HEADER + summary.text.strip()}]))
    return {"method": "compact", "after": [sum(g.correct) for g in got],
            "after_f1": [g.mean_f1 for g in got], "after_em": [g.mean_exact for g in got],
            "answers": [g.answers for g in got], "correct": [list(g.correct) for g in got],
            "summaries": summaries,
            "forgetting": {**forgetting_base, "kl_to_base": 0.0},
            "cost": {"seconds": time.time() - t0, "train_seconds": 0.0, "peak_mb": float("nan"),
                     "tokens_teacher": tokens, "tokens_student": 0, "adapter_bytes": 0,
                     "kv_cache_bytes": sum(kv[s.index] for s in sessions)},
            "kl_curve": [], "loss_curve": []}


def _joint(cfg: KnowledgeConfig, sessions: Sequence[Session], method: str, probes_ctx,
           kv: dict[int, int], log: Callable[[str], None], forgetting_base: dict) -> dict:
    """Consolidate `sessions` together into one adapter; answer all their questions after."""
    if method == "compact":
        return _compact_joint(cfg, sessions, forgetting_base, kv)
    budget = (f"{cfg.joint_steps} steps" if cfg.joint_steps else
              f"{cfg.visits:g} visits per practice prompt" if cfg.visits else f"{cfg.steps} steps")
    groups = batches(sessions, cfg.rounds)
    log(f"joint {method}: {len(sessions)} sessions into one adapter"
        + (f" in {len(groups)} rounds of {len(groups[0])} (each version a child of the last, "
           f"as a tenant's nightly consolidations)" if len(groups) > 1 else "") + f", {budget}")
    # A child continues its parent's weights; a stacked round trains a fresh adapter over
    # the earlier rounds' adapters, frozen (the teacher is then that stack with the session).
    stacked = method in STACKED
    parent, rounds, spent, below = None, [], [], []
    with tempfile.TemporaryDirectory(prefix="rounds-") as chain:
        for k, group in enumerate(groups):
            lm = load_model(cfg.model, device=cfg.device)
            trainer, history, cost = _train(cfg, lm, group, method, cfg.lr, cfg.seed,
                                            parent=None if stacked else parent,
                                            steps=cfg.joint_steps, log=log,
                                            stack_below=list(below))
            spent.append((history, cost))
            if k < len(groups) - 1:
                so_far = sessions[:sum(len(g) for g in groups[:k + 1])]
                with trainer.frozen_student():
                    got, _ = evaluate(lm, so_far)
                right = sum(sum(g.correct) for g in got)
                asked = sum(len(x.questions) for x in so_far)
                rounds.append({"round": k + 1, "sessions": len(so_far), "after": right,
                               "questions": asked, "kl_to_base": _kl(history),
                               "per_session": [sum(g.correct) for g in got]})
                log(f"  round {k + 1}/{len(groups)}: {right}/{asked} of the sessions so far, "
                    f"KL {_kl(history):.3f}, {cost['seconds']:.0f} s")
                parent = str(Path(chain) / f"r{k + 1}")
                save(lm.model, STUDENT, parent, meta={"method": method, "bench": "knowledge"})
                below.append(parent)
        history = [h for hs, _ in spent for h in hs]
        cost = _sum_costs([c for _, c in spent])
        with trainer.frozen_student():
            got, forgetting = evaluate(lm, sessions, probes_ctx)
            recall = practice_recall(lm, sessions)
        forgetting = {"reading": float("nan"), "general": float("nan"), **forgetting,
                      "kl_to_base": _kl(history)}
        with tempfile.TemporaryDirectory() as tmp:
            save(lm.model, STUDENT, Path(tmp) / "adapter")
            # A stack is served as all its adapters: their bytes add up.
            cost["adapter_bytes"] = adapter_bytes(Path(tmp) / "adapter") + (
                sum(adapter_bytes(b) for b in below) if stacked else 0)
    cost["kv_cache_bytes"] = sum(kv[s.index] for s in sessions)
    return {"method": method, "after": [sum(g.correct) for g in got],
            "after_f1": [g.mean_f1 for g in got], "after_em": [g.mean_exact for g in got],
            "answers": [g.answers for g in got], "correct": [list(g.correct) for g in got],
            "forgetting": forgetting, "cost": cost, "rounds": rounds,
            "practice_recall": recall, "kl_curve": [h.get("kl_to_base", 0.0) for h in history],
            "loss_curve": [h["loss"] for h in history]}


def practice_recall(lm: LoadedModel, sessions: Sequence[Session], batch: int = 16) -> dict:
    """The model's no-context answers to the training prompts whose answer span is known (rule
    and span kinds): the share that contain the span. Beside the transfer ratio (paraphrases
    training never saw) it tells a student that did not fit its own lessons from one that fit
    them and did not generalize."""
    asked, owner = [], []
    for k, s in enumerate(sessions):
        trained = set(s.probes)
        mine = [p for p in s.practice if p.answer and p.text in trained]
        asked += mine
        owner += [k] * len(mine)
    if not asked:
        return {"prompts": 0, "recall": float("nan")}
    got = answer(lm, [p.text.removesuffix(ANSWER_HINT) for p in asked], [p.answer for p in asked],
                 batch=batch)
    by_kind = {}
    for kind in sorted({p.kind for p in asked}):
        hits = [float(c) for p, c in zip(asked, got.correct, strict=True) if p.kind == kind]
        by_kind[kind] = {"prompts": len(hits), "recall": _mean(hits)}
    # Per session, the spans asked and whether each was answered: what `by_fit` joins to the
    # evaluation questions whose gold answer is one of them.
    spans: list[list[list]] = [[] for _ in sessions]
    for k, p, c in zip(owner, asked, got.correct, strict=True):
        spans[k].append([p.answer, bool(c)])
    return {"prompts": len(asked), "recall": _mean([float(c) for c in got.correct]),
            "by_kind": by_kind, "spans": spans}


def by_fit(sessions: Sequence[Session], recall: dict | None,
           correct: Sequence[Sequence[bool]] | None, threshold: float = 0.5) -> dict:
    """The covered questions apart by whether the student fit their lesson: "fit" where some
    trained prompt whose span matches the gold answer (token F1 >= threshold) was answered with
    its span after training, "unfit" where none was. Transfer in the fit part is what a
    student that learned its lessons carries to paraphrases; in the unfit part it had nothing
    to carry. Measured only."""
    spans = (recall or {}).get("spans")
    if correct is None or not spans or len(spans) != len(sessions):
        return {}
    rows: dict[str, list] = {"fit": [], "unfit": []}
    for s, c, mine in zip(sessions, correct, spans, strict=True):
        for i, gold in enumerate(s.golds):
            matching = [right for span, right in mine if f1(span, gold) >= threshold]
            if matching:
                rows["fit" if any(matching) else "unfit"].append(
                    (s.base.correct[i], s.in_context.correct[i], c[i]))
    out = {}
    for name, got in rows.items():
        n = len(got)
        base, ceil, after = (sum(r[k] for r in got) / n if n else float("nan") for k in range(3))
        out[name] = {"questions": n, "base": base, "in_context": ceil, "after": after,
                     "transfer_ratio": _ratio(after, base, ceil) if n else float("nan")}
    return out


def batches(items: Sequence, rounds: int) -> list[list]:
    """`items` in `rounds` consecutive batches, as even as they go (never an empty one)."""
    n = max(1, min(rounds, len(items)))
    size, extra = divmod(len(items), n)
    out, at = [], 0
    for k in range(n):
        step = size + (k < extra)
        out.append(list(items[at:at + step]))
        at += step
    return out


def _sum_costs(costs: Sequence[dict]) -> dict:
    """The cost of several trainings in a row: times, steps and tokens add up, peak is the max."""
    if len(costs) == 1:
        return dict(costs[0])
    out = dict(costs[-1])
    for key in ("seconds", "steps", "train_seconds", "tokens_student", "tokens_teacher"):
        out[key] = sum(c.get(key, 0) for c in costs)
    out["peak_mb"] = max(c.get("peak_mb", 0.0) for c in costs)
    rows: dict = {}
    for c in costs:
        for k, v in c.get("teacher_rows", {}).items():
            rows[k] = rows.get(k, 0) + v if isinstance(v, int | float) else v
    out["teacher_rows"] = rows
    return out


def summarize_joint(sessions: Sequence[Session], joint: dict, forgetting_base: dict) -> dict:
    if not joint:
        return {}
    n_q = [len(s.questions) for s in sessions]
    total = max(sum(n_q), 1)
    base = sum(sum(s.base.correct) for s in sessions) / total
    ceiling = sum(sum(s.in_context.correct) for s in sessions) / total
    base_f1 = _mean([f for s in sessions for f in s.base.f1])
    ceil_f1 = _mean([f for s in sessions for f in s.in_context.f1])
    base_em = _mean([float(e) for s in sessions for e in s.base.exact])
    ceil_em = _mean([float(e) for s in sessions for e in s.in_context.exact])
    methods = {}
    for m, j in joint.items():
        after = sum(j["after"]) / total
        after_f1 = sum(f * q for f, q in zip(j["after_f1"], n_q, strict=True)) / total
        after_em = sum(e * q for e, q in zip(j["after_em"], n_q, strict=True)) / total
        methods[m] = {
            "after": after, "after_f1": after_f1, "after_em": after_em, "per_session": j["after"],
            "transfer_ratio": _ratio(after, base, ceiling),
            "transfer_ratio_f1": _ratio(after_f1, base_f1, ceil_f1),
            "transfer_ratio_em": _ratio(after_em, base_em, ceil_em),
            "reading_drop_pts": 100 * (forgetting_base["reading"] - j["forgetting"]["reading"]),
            "general_drop_pts": 100 * (forgetting_base["general"] - j["forgetting"]["general"]),
            "kl_to_base": j["forgetting"]["kl_to_base"],
            "cost": {**j["cost"], "seconds_per_session": j["cost"]["seconds"] / len(sessions)},
            "kl_curve": j["kl_curve"], "loss_curve": j["loss_curve"], "answers": j["answers"],
            "rounds": j.get("rounds", []), "practice_recall": j.get("practice_recall"),
            "by_coverage": by_coverage(sessions, j.get("correct")),
            "by_fit": by_fit(sessions, j.get("practice_recall"), j.get("correct")),
            "general_lost": general_lost(forgetting_base, j["forgetting"])}
    return {"sessions": [s.index for s in sessions], "titles": [s.title for s in sessions],
            "articles": [s.number for s in sessions],
            "questions": n_q, "base_per_session": [sum(s.base.correct) for s in sessions],
            "in_context_per_session": [sum(s.in_context.correct) for s in sessions],
            "base": base, "in_context": ceiling, "base_f1": base_f1, "in_context_f1": ceil_f1,
            "base_em": base_em, "in_context_em": ceil_em,
            "coverage": _mean([s.coverage for s in sessions]),
            "practice_prompts": [len(s.probes) for s in sessions],
            "methods": methods}


def by_coverage(sessions: Sequence[Session], correct: Sequence[Sequence[bool]] | None) -> dict:
    """The transfer ratio apart for the questions whose fact the practice material asks
    about (covered) and for the rest: it tells a learning rule that does not learn what it
    was shown from practice material that never showed it."""
    if correct is None or any(len(s.covered) != len(s.questions) for s in sessions):
        return {}
    out = {}
    for name, want in (("covered", True), ("uncovered", False)):
        rows = [(s.base.correct[i], s.in_context.correct[i], c[i])
                for s, c in zip(sessions, correct, strict=True)
                for i in range(len(s.questions)) if s.covered[i] == want]
        n = len(rows)
        base, ceil, after = (sum(r[k] for r in rows) / n if n else float("nan") for k in range(3))
        out[name] = {"questions": n, "base": base, "in_context": ceil, "after": after,
                     "transfer_ratio": _ratio(after, base, ceil) if n else float("nan")}
    return out


# -- summary -------------------------------------------------------------------------------


def _ratio(after: float, base: float, ceiling: float) -> float:
    gap = ceiling - base
    return (after - base) / gap if gap > 0 else float("nan")


def _spread(values: Sequence[float]) -> dict:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _mean(values) -> float:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(vals) if vals else float("nan")


def retention(correct: Sequence[Sequence[float]], base: Sequence[float]) -> list[float | None]:
    """Share of the immediate gain kept, pooled over sessions, by lag (sessions consolidated
    since): kept(lag) = sum_j (acc[j+lag][j] - base_j) / sum_j (acc[j][j] - base_j) over the
    sessions j that have a measurement at that lag; None where the pooled gain is not > 0."""
    n = len(correct)
    out: list[float | None] = []
    for lag in range(n):
        js = range(n - lag)
        gain = sum(correct[j][j] - base[j] for j in js)
        kept = sum(correct[j + lag][j] - base[j] for j in js)
        out.append(kept / gain if gain > 0 else None)
    return out


def summarize(cfg: KnowledgeConfig, sessions: Sequence[Session], runs: list[dict],
              sequential: dict, forgetting_base: dict, seeds: Sequence[int], seconds: float,
              n_indep: int | None = None, sizes: dict | None = None) -> dict:
    indep = list(sessions[: n_indep if n_indep is not None else cfg.sessions])
    total = sum(len(s.questions) for s in indep)
    base_n = sum(sum(s.base.correct) for s in indep)
    ceil_n = sum(sum(s.in_context.correct) for s in indep)
    base, ceiling = base_n / max(total, 1), ceil_n / max(total, 1)
    base_f1 = _mean([f for s in indep for f in s.base.f1])
    ceil_f1 = _mean([f for s in indep for f in s.in_context.f1])

    def points(method: str, lr: float, seed: int) -> list[dict]:
        return [r for r in runs if r["method"] == method and r["lr"] == lr and r["seed"] == seed]

    def pooled(rs: list[dict]) -> dict:
        n_q = {s.index: len(s.questions) for s in indep}
        after = sum(r["after"] for r in rs) / max(total, 1)
        after_f1 = sum(r["after_f1"] * n_q[r["session"]] for r in rs) / max(total, 1)
        return {"after": after, "after_f1": after_f1,
                "transfer_ratio": _ratio(after, base, ceiling),
                "transfer_ratio_f1": _ratio(after_f1, base_f1, ceil_f1),
                "gain_pts": 100 * (after - base),
                "reading_drop_pts": 100 * (forgetting_base["reading"]
                                           - _mean(r["forgetting"]["reading"] for r in rs)),
                "general_drop_pts": 100 * (forgetting_base["general"]
                                           - _mean(r["forgetting"]["general"] for r in rs)),
                "kl_to_base": _mean(r["forgetting"]["kl_to_base"] for r in rs)}

    methods = {}
    for m in cfg.methods:
        per_seed = [pooled(points(m, cfg.lr, seed)) for seed in seeds]
        rs = [r for seed in seeds for r in points(m, cfg.lr, seed)]
        if not rs:
            continue
        cost = {k: _mean(r["cost"][k] for r in rs) for k in
                ("seconds", "train_seconds", "peak_mb", "tokens_student", "tokens_teacher",
                 "adapter_bytes", "kv_cache_bytes")}
        cost["peak_mb_max"] = max(r["cost"]["peak_mb"] for r in rs)
        cost["peak_kind"] = rs[0]["cost"]["peak_kind"]
        methods[m] = {
            "after": _mean(p["after"] for p in per_seed),
            "transfer_ratio": _spread([p["transfer_ratio"] for p in per_seed])["mean"],
            "transfer": _spread([p["transfer_ratio"] for p in per_seed]),
            "transfer_f1": _spread([p["transfer_ratio_f1"] for p in per_seed]),
            "per_seed": dict(zip([str(s) for s in seeds], per_seed, strict=True)),
            "reading_drop_pts": _mean(p["reading_drop_pts"] for p in per_seed),
            "general_drop_pts": _mean(p["general_drop_pts"] for p in per_seed),
            "kl_to_base": _mean(p["kl_to_base"] for p in per_seed),
            # kept for readers of the first version of this report
            "seconds_per_session": cost["seconds"], "peak_rss_mb": cost["peak_mb_max"],
            "cost": cost,
        }
    sweep = []
    for m in cfg.methods if any(lr != cfg.lr for lr in cfg.lrs) else ():
        if m not in SWEEP_METHODS:
            continue
        for lr in sorted({r["lr"] for r in runs if r["method"] == m and r["seed"] == seeds[0]}):
            sweep.append({"method": m, "lr": lr, **pooled(points(m, lr, seeds[0]))})

    seq_out = {}
    for m, seq in sequential.items():
        chain = sessions[: len(seq["correct"])]
        base_c = [sum(s.base.correct) for s in chain]
        base_f = [s.base.mean_f1 for s in chain]
        n_q = [len(s.questions) for s in chain]
        so_far = [sum(row) / sum(n_q[: len(row)]) for row in seq["correct"]]
        seq_out[m] = {
            **seq,
            "base": base_c, "questions": n_q,
            "retention": retention(seq["correct"], base_c),
            "retention_f1": retention(seq["f1"], base_f),
            "accuracy_so_far": so_far,
            "base_so_far": [sum(base_c[: k + 1]) / sum(n_q[: k + 1]) for k in range(len(chain))],
            "in_context_so_far": [sum(sum(s.in_context.correct) for s in chain[: k + 1])
                                  / sum(n_q[: k + 1]) for k in range(len(chain))],
            "forgetting_drop_pts": {k: 100 * (forgetting_base[k] - seq["forgetting"][k])
                                    for k in ("reading", "general") if seq["forgetting"]},
        }

    rows = []
    for s in indep:
        row = {"article": s.title, "index": s.index, "questions": len(s.questions),
               "base": sum(s.base.correct), "in_context": sum(s.in_context.correct),
               "base_f1": s.base.mean_f1, "in_context_f1": s.in_context.mean_f1,
               "probes": len(s.probes), "probe_quality": s.probe_quality,
               "context_tokens": s.context_tokens, "probe_seconds": s.probe_seconds,
               "methods": {}}
        for m in cfg.methods:
            mine = [r for r in runs if r["method"] == m and r["lr"] == cfg.lr
                    and r["session"] == s.index]
            if mine:
                row["methods"][m] = {**mine[0], "after_by_seed": [r["after"] for r in mine]}
        rows.append(row)

    bf16 = native_bf16(cfg.device) if cfg.bf16 is None else cfg.bf16
    return {"config": {**asdict(cfg), "methods": list(cfg.methods), "bf16_used": bf16,
                       "sequential_methods": list(cfg.sequential_methods), "lrs": list(cfg.lrs)},
            "seeds": list(seeds), "questions": total, "base": base, "in_context": ceiling,
            "base_f1": base_f1, "in_context_f1": ceil_f1,
            "reading_base": forgetting_base["reading"], "forgetting_base": forgetting_base,
            "probe_sizes": sizes or {}, "methods": methods, "sweep": sweep,
            "sequential": seq_out, "rows": rows, "runs": runs, "seconds": seconds,
            "machine": machine(), "date": date.today().isoformat()}


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()}, {torch.get_num_threads()} threads{gpu}, "
            f"Python {sys.version.split()[0]}, torch {torch.__version__}")


def markdown(result: dict, command: str, plots: dict[str, str] | None = None,
             md_dir: str | None = None) -> str:
    from onthejob.bench.knowledge_report import report

    return report(result, command, plots or {}, md_dir)
