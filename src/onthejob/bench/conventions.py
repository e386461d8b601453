"""The conventions benchmark: a team's way of working (formats, units, names, policies,
workflows, tone), taught in a co-work session and consolidated into the tenant's adapter.
Data and checkers: data/conventions.json, bench/convention_checks.py (no model judge).

Per convention, one tenant. Its co-work session: the user states the convention up front
(the model's acknowledgement is scripted), or asks one of the convention's TRAIN prompts,
gets the model's answer without the convention and corrects it; then asks a few more TRAIN
prompts, each answered by the model itself (greedy) with the session so far in context, so
the session holds examples. The session is approved and consolidated. Its practice prompts
are the session's own short user turns (learn/practice.replayed: each with the answer the
session gave; for the corrected turn, the answer the user accepted, not the one corrected)
plus the convention's other TRAIN prompts (the tenant's other traffic it applies to). Scored
on the EVAL prompts only; no eval prompt may be in the session or in any training prompt
(asserted: LeakError).

Rows (adherence = share of eval replies the checker passes):
  base        the model never taught;
  in context  the session before the prompt (the ceiling of what the session can teach);
  memory      the convention's rule kept as text in the system prompt, as memory layers
              (Letta, mem0) do: the strong cheap baseline; its tokens per request counted;
  opsd, sft, notes  after consolidating the session (learn/: Opsd with consolidation's
              defaults, sft on the transcript, notes), the prompt asked without context.
Parts, sized by options:
  isolation   tenant B's opsd adapter answering tenant A's eval prompts, scored for A's
              convention, minus A's base rate: the cross-tenant leak (pts);
  retention   one tenant learns N conventions over N consolidations, each version the child
              of the last, with the promotion gate (learn/gate.decide) on; adherence to every
              convention so far after each round;
  shared      three tenants that allow shared learning each teach one convention in their
              own session (its statements in turn, each with its own third of the train
              prompts as traffic); the sessions are consolidated together into the shared
              adapter (opsd), registered and activated in a store; a fourth tenant that
              allows shared learning and a fifth that does not are served as the server
              serves them (serve/turns.AdapterResolver) and answer its eval prompts;
  forgetting  after each consolidation: general questions and in-context reading
              (bench/measures.py, as the knowledge bench measures them), and KL to the base.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from onthejob.bench.convention_checks import KEEP_AT, Convention, by_ids, load
from onthejob.bench.measures import (
    PeakMemory,
    adapter_bytes,
    general_right,
    reading_prompt,
    reading_set,
)
from onthejob.learn.drift import TRAINING_ANCHORS, AnchorDrift
from onthejob.learn.evaluate import answer, f1
from onthejob.learn.gate import (
    GateConfig,
    decide,
    gate_general_set,
    general_accuracy,
    general_set,
    reading_accuracy,
)
from onthejob.learn.lesson import (
    REVIEW_HEADER,
    Lesson,
    default_system,  # noqa: F401 (the bench's name for it; tests use it)
    instruction_messages,
    review_turns,
)
from onthejob.learn.loop import STUDENT, TrainConfig, Trainer, print_progress, report_rate
from onthejob.learn.notes import Notes
from onthejob.learn.opsd import Opsd, OpsdConfig, planned_probes, steps_for_visits
from onthejob.learn.practice import PracticePrompt, assert_unseen, replayed
from onthejob.learn.sft import Sft
from onthejob.model import LoadedModel, SamplingParams, generate, load_model, render_ids
from onthejob.model.adapters import save, use_adapter
from onthejob.model.decoder import native_bf16

METHODS = ("opsd", "sft", "notes")
FORMS = ("statement", "correction", "mixed")
ACK = "Understood. I will do that from now on."  # scripted, after an up-front statement
MEMORY_HEADER = "What you remember about the team you work for:"
REVIEWS = ("none", "rule", "rule-after")
GATE_HELD = 4  # retention chain: train prompts held back from training for the gate


@dataclass
class ConventionsConfig:
    conventions: Sequence[str] = ()  # ids (default: every convention the screen kept)
    n: int | None = None  # the first n of them
    methods: Sequence[str] = METHODS
    form: str = "mixed"  # how the session teaches: statement, correction, or alternating
    examples: int = 3  # train prompts the session asks (answered by the model in context)
    visits: float = 8.0  # the budget: visits per practice prompt, the same for every method
    lr: float = 1e-3
    seed: int = 0
    max_tokens: int = 48  # reply budget (a convention's own max_tokens wins)
    isolation: bool = True
    retention: int = 0  # conventions one tenant learns in sequence (0: no retention part)
    gate: bool = True  # the retention chain promotes only what passes the gate
    shared: str | None = None  # the convention the shared-adapter part teaches (None: no part)
    general_items: int | None = 24
    reading_items: int = 6  # in-context reading items from articles 1000+ of `squad`
    squad: str | None = None  # squad_seal_val.json (none: no reading items)
    opsd: OpsdConfig = field(default_factory=OpsdConfig)
    notes_per_session: int = 4
    notes_tokens: int = 160
    data: str | None = None  # the conventions file (default: the package's)
    bf16: bool | None = None
    model: str | None = None
    device: str = "cpu"
    work: str | None = None  # keep finished consolidations (and opsd adapters) here; a rerun
    #                          with the same settings resumes from them (None: a temporary dir)
    # What the session's review says: "none" (no words), or the convention's rule in the user's
    # own words (the memory row's words), which the teacher reads either in its system prompt
    # before the session, as a memory layer would put it (REVIEW_HEADER): "rule"; or after the
    # session, as `onthejob consolidate` gives a review's words (learn.lesson.review_turns):
    # "rule-after".
    review: str = "none"


# -- prompts and replies ------------------------------------------------------------------------


def memory_messages(tokenizer, rule: str) -> list[dict]:
    """The memory row's context: the template's own system prompt plus the rule's words."""
    return instruction_messages(tokenizer, MEMORY_HEADER, rule)


def context_tokens(tokenizer, context: Sequence[dict]) -> int:
    """Tokens that `context` adds in front of every request (against no context)."""
    ask = [{"role": "user", "content": "x"}]
    return len(render_ids(tokenizer, [*context, *ask])) - len(render_ids(tokenizer, ask))


def replies(lm: LoadedModel, chats: Sequence[Sequence[dict]], max_tokens: Sequence[int] | int,
            batch: int = 16) -> list[str]:
    """Greedy replies to each chat (in the model's current view), batched by reply budget."""
    budgets = [max_tokens] * len(chats) if isinstance(max_tokens, int) else list(max_tokens)
    out: list[str | None] = [None] * len(chats)
    started, done = time.time(), 0
    for budget in sorted(set(budgets)):
        rows = [i for i, b in enumerate(budgets) if b == budget]
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            prompts = [render_ids(lm.tokenizer, list(chats[i])) for i in chunk]
            for i, o in zip(chunk, generate(lm, prompts, SamplingParams(max_tokens=budget)),
                            strict=True):
                out[i] = o.text.strip()
            done += len(chunk)
            if len(chats) > batch:  # a long pass says how far it is (stderr)
                report_rate("replies", "replies", done, len(chats), started)
    return [o or "" for o in out]


def _budget(c: Convention, cfg_tokens: int) -> int:
    return max(c.max_tokens or cfg_tokens, cfg_tokens)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def adherence(lm: LoadedModel, conventions: Sequence[Convention], max_tokens: int,
              context: Callable[[Convention], list[dict]] = lambda c: []
              ) -> dict[str, tuple[list[bool], list[str]]]:
    """Per convention: whether each eval reply follows it, and the replies; `context(c)` goes
    before every eval prompt of c. One batched pass over all conventions."""
    chats, budgets, owner = [], [], []
    for c in conventions:
        for p in c.eval:
            chats.append([*context(c), _user(p)])
            budgets.append(_budget(c, max_tokens))
            owner.append(c.id)
    got = replies(lm, chats, budgets)
    out: dict[str, tuple[list[bool], list[str]]] = {c.id: ([], []) for c in conventions}
    by_id = {c.id: c for c in conventions}
    for cid, text in zip(owner, got, strict=True):
        out[cid][0].append(by_id[cid].follows(text))
        out[cid][1].append(text)
    return out


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def _mean(values) -> float:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(vals) if vals else float("nan")


# -- the screen ---------------------------------------------------------------------------------


def screen(lm: LoadedModel, conventions: Sequence[Convention], max_tokens: int = 48,
           log: Callable[[str], None] = print) -> dict:
    """Adherence over the eval prompts: base, with the convention stated in context (its first
    up-front statement and the scripted acknowledgement), and as memory (system prompt). Kept:
    in context >= KEEP_AT."""
    t0 = time.time()
    rows = {}
    views = {"base": lambda c: [],
             "in_context": lambda c: [_user(c.statements[0]), {"role": "assistant", "content": ACK}],
             "memory": lambda c: memory_messages(lm.tokenizer, c.rule)}
    got = {}
    for k, (name, ctx) in enumerate(views.items()):
        got[name] = adherence(lm, conventions, max_tokens, ctx)
        log(f"screen [{k + 1}/{len(views)}] {name}: mean adherence "
            f"{_mean(_rate(v[0]) for v in got[name].values()):.1%}, "
            f"{(time.time() - t0) / 60:.1f} min elapsed, ETA "
            f"{(time.time() - t0) / (k + 1) * (len(views) - k - 1) / 60:.1f} min")
    for c in conventions:
        rates = {name: _rate(got[name][c.id][0]) for name in views}
        rows[c.id] = {**rates, "kept": rates["in_context"] >= KEEP_AT, "n": len(c.eval),
                      "kind": c.kind,
                      "replies": {name: got[name][c.id][1] for name in views}}
        log(f"  {c.id:18s} base {rates['base']:.0%}  in context {rates['in_context']:.0%}  "
            f"memory {rates['memory']:.0%}  {'kept' if rows[c.id]['kept'] else 'DROPPED'}")
    return {"date": date.today().isoformat(), "model": lm.path, "max_tokens": max_tokens,
            "keep_at": KEEP_AT, "seconds": time.time() - t0, "conventions": rows}


def record_screen(result: dict, data_file: str | Path) -> None:
    """Write the screen's figures (without the example replies) into the conventions file."""
    path = Path(data_file)
    doc = json.loads(path.read_text())
    doc["screen"] = {
        "note": (f"Screened on {Path(result['model']).name} ({result['date']}): greedy, {result['max_tokens']} "
                 f"new tokens (more where a convention says so), adherence over the 16 eval "
                 f"prompts with the first statement and a scripted acknowledgement in context; "
                 f"kept where that is >= {result['keep_at']:.0%}. Rates: base (no context), "
                 "in_context, memory (the rule in the system prompt)."),
        "conventions": {cid: {k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in row.items() if k != "replies"}
                        for cid, row in result["conventions"].items()}}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


# -- one tenant's session -----------------------------------------------------------------------


@dataclass
class Taught:
    """One tenant's convention, its teaching session and what is measured without training."""

    convention: Convention
    form: str
    context: list[dict]
    asked: list[str]  # the train prompts the session asked
    session_follows: list[bool]  # whether the session's (final) answers to them follow it
    practice: list[PracticePrompt]
    base: list[bool] = field(default_factory=list)
    in_context: list[bool] = field(default_factory=list)
    memory: list[bool] = field(default_factory=list)
    teacher: list[bool] = field(default_factory=list)  # the review's words, then the session
    replies: dict = field(default_factory=dict)
    context_tokens: int = 0
    memory_tokens: int = 0
    review: list[dict] = field(default_factory=list)  # the teacher's system message (the review)
    feedback: list[dict] = field(default_factory=list)  # the review's turns after the session

    def teacher_context(self) -> list[dict]:
        """What the teacher reads: the review's system message, the session, the review's turns
        after it (either or both review parts empty)."""
        return [*self.review, *self.context, *self.feedback]

    def lesson(self, held_back: Sequence[str] = ()) -> Lesson:
        """What consolidation learns from: the teacher's context (the session with the review,
        where there is one) and its practice prompts less `held_back`."""
        practice = [p for p in self.practice if p.text not in set(held_back)]
        return Lesson(f"convention-{self.convention.id}", self.teacher_context(),
                      [p.text for p in practice], practice=practice,
                      review=self.convention.rule if self.review or self.feedback else "")


def review_messages(tokenizer, words: str) -> list[dict]:
    """The review's words in the teacher's system prompt (after the template's own)."""
    return instruction_messages(tokenizer, REVIEW_HEADER, words)


def _form(cfg_form: str, k: int) -> str:
    return ("statement", "correction")[k % 2] if cfg_form == "mixed" else cfg_form


def teach(lm: LoadedModel, conventions: Sequence[Convention], form: str, examples: int,
          max_tokens: int) -> list[Taught]:
    """Each convention's co-work session (module docstring), built turn by turn for all of them
    at once (one batched generation per turn)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}")
    forms = [_form(form, k) for k in range(len(conventions))]
    asked = [c.train[:max(examples, 1)] for c in conventions]
    contexts: list[list[dict]] = []
    for k, (c, f) in enumerate(zip(conventions, forms, strict=True)):
        if f == "statement":
            contexts.append([_user(c.statements[k % len(c.statements)]),
                             {"role": "assistant", "content": ACK}])
        else:
            contexts.append([])
    # A correction: the first prompt answered without the convention, then corrected.
    wrong = [k for k, f in enumerate(forms) if f == "correction"]
    first = replies(lm, [[_user(asked[k][0])] for k in wrong],
                    [_budget(conventions[k], max_tokens) for k in wrong])
    for k, text in zip(wrong, first, strict=True):
        c = conventions[k]
        contexts[k] += [_user(asked[k][0]), {"role": "assistant", "content": text or "..."},
                        _user(c.corrections[k % len(c.corrections)])]
    final: list[list[str]] = [[] for _ in conventions]
    for turn in range(max(len(a) for a in asked)):
        rows = [k for k in range(len(conventions)) if turn < len(asked[k])]
        chats = []
        for k in rows:
            corrected = forms[k] == "correction" and turn == 0
            chats.append(contexts[k] if corrected else [*contexts[k], _user(asked[k][turn])])
        got = replies(lm, chats, [_budget(conventions[k], max_tokens) for k in rows])
        for k, text in zip(rows, got, strict=True):
            text = text or "..."  # the chat template needs a non-empty turn
            if not (forms[k] == "correction" and turn == 0):
                contexts[k].append(_user(asked[k][turn]))
            contexts[k].append({"role": "assistant", "content": text})
            final[k].append(text)
    out = []
    for k, c in enumerate(conventions):
        out.append(Taught(c, forms[k], contexts[k], asked[k],
                          [c.follows(t) for t in final[k]],
                          practice_for(c, contexts[k], forms[k], asked[k], final[k])))
    return out


def practice_for(c: Convention, context: Sequence[dict], form: str, asked: Sequence[str],
                 final: Sequence[str]) -> list[PracticePrompt]:
    """The session's short user turns with the answers it gave (the corrected first turn
    with the answer the user accepted), then the convention's other train prompts."""
    turns = replayed(context)
    if form == "correction":
        turns = [PracticePrompt(p.text, p.kind, given=final[0]) if p.text == asked[0] else p
                 for p in turns]
    seen = {p.text for p in turns}
    traffic = [PracticePrompt(p, "traffic") for p in c.train if p not in seen]
    return [*turns, *traffic]


def check_unseen(t: Taught, extra_training: Sequence[str] = ()) -> None:
    """No eval prompt of the convention in its session, its practice prompts (with the answers
    given to them), the training anchors or `extra_training` (LeakError)."""
    texts = [m["content"] for m in t.teacher_context()]
    texts += [p.text for p in t.practice] + [p.given for p in t.practice if p.given]
    assert_unseen(t.convention.eval, [*texts, *TRAINING_ANCHORS, *extra_training])


# -- consolidation ------------------------------------------------------------------------------


@functools.cache
def eval_prompts() -> tuple[str, ...]:
    """Every convention's evaluation prompts: no self-written anchor may resemble one (read
    from the conventions file once)."""
    return tuple(p for c in load(kept_only=False) for p in c.eval)


def _rule(method: str, lessons: Sequence[Lesson], lm: LoadedModel, cfg: ConventionsConfig):
    if method == "opsd":
        return Opsd(lessons, list(TRAINING_ANCHORS), cfg.opsd, avoid=eval_prompts())
    if method == "sft":
        return Sft(lessons, lm.tokenizer)
    if method == "notes":
        return Notes(lessons, notes_per_session=cfg.notes_per_session,
                     max_new_tokens=cfg.notes_tokens)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def train(cfg: ConventionsConfig, lm: LoadedModel, lesson: Lesson, method: str,
          parent: str | None = None, log: Callable[[str], None] | None = None
          ) -> tuple[Trainer, dict]:
    """Consolidate one lesson into the student adapter (a child of `parent` when given); the
    same budget for every method: the steps that give OPSD's prompts `visits` visits."""
    t0 = time.time()
    with PeakMemory(lm.device) as peak:
        bf16 = native_bf16(lm.device) if cfg.bf16 is None else cfg.bf16
        steps = steps_for_visits(planned_probes([lesson], cfg.opsd), cfg.visits, cfg.opsd)
        trainer = Trainer(lm, TrainConfig(steps=steps, lr=cfg.lr, seed=cfg.seed, bf16=bf16,
                                          log_every=10), parent=parent)
        rule = _rule(method, [lesson], lm, cfg)
        progress = print_progress(f"    [{method}] ", write=log) if log else None
        history = trainer.run(rule, progress=progress)
        kl = AnchorDrift()(trainer)
    return trainer, {"seconds": time.time() - t0, "steps": len(history), "kl_to_base": kl,
                     "peak_mb": peak.peak_mb, "peak_kind": peak.kind,
                     "loss_first": history[0]["loss"] if history else float("nan"),
                     "loss_last": history[-1]["loss"] if history else float("nan"),
                     "teacher_rows": dict(getattr(rule, "counts", {})),
                     "tokens_student": getattr(rule, "tokens_student", 0),
                     "tokens_teacher": getattr(rule, "tokens_teacher", 0)}


def forgetting(lm: LoadedModel, reading_items: Sequence[dict], general_items: Sequence[dict]
               ) -> dict:
    """In-context reading and general questions, in the model's current view (one pass)."""
    questions = [reading_prompt(it) for it in reading_items] + [it["question"] for it in general_items]
    golds = [it["answer"] for it in reading_items] + [it["answers"][0] for it in general_items]
    if not questions:
        return {"reading": float("nan"), "general": float("nan")}
    got = answer(lm, questions, golds, batch=16)
    r = len(reading_items)
    return {"reading": _rate(got.correct[:r]),
            "general": _rate(general_right(got.answers[r:], general_items))}


class _Clock:
    """Progress over the consolidations of the whole run: rate and ETA."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.done, self.log, self.started = max(total, 1), 0, log, time.time()

    def tick(self, text: str) -> None:
        self.done += 1
        elapsed = time.time() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        self.log(f"  [{self.done}/{self.total}] {text} | {elapsed / 60:.1f} min elapsed, "
                 f"{elapsed / self.done:.0f} s/consolidation, ETA {eta / 60:.1f} min")


# -- the run ------------------------------------------------------------------------------------


def pick(cfg: ConventionsConfig) -> list[Convention]:
    conventions = load(cfg.data)
    if cfg.conventions:
        conventions = by_ids(load(cfg.data, kept_only=False), cfg.conventions)
    return conventions[: cfg.n] if cfg.n else conventions


def run(cfg: ConventionsConfig, log: Callable[[str], None] = print) -> dict:
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if cfg.review not in REVIEWS:
        raise ValueError(f"unknown review {cfg.review!r}; choose from {', '.join(REVIEWS)}")
    started = time.time()
    conventions = pick(cfg)
    if not conventions:
        raise ValueError("no conventions to run")
    n_ret = min(cfg.retention, len(conventions))
    iso = cfg.isolation and "opsd" in cfg.methods and len(conventions) > 1
    total = len(conventions) * len(cfg.methods) + n_ret + bool(cfg.shared)
    shared_convention = by_ids(load(cfg.data, kept_only=False), [cfg.shared])[0] \
        if cfg.shared else None
    general_items = general_set()[: cfg.general_items]
    assert_unseen([it["question"] for it in general_items], TRAINING_ANCHORS)
    reading_items = []
    if cfg.squad and cfg.reading_items:
        reading_items = reading_set(json.loads(Path(cfg.squad).read_text()), cfg.reading_items)
    log(f"{len(conventions)} conventions ({', '.join(c.id for c in conventions)}); "
        f"{total} consolidations at {cfg.visits:g} visits per practice prompt, lr {cfg.lr:g}: "
        f"{list(cfg.methods)} per convention, isolation {'on' if iso else 'off'}, retention chain "
        f"{n_ret} (gate {'on' if cfg.gate else 'off'}), shared adapter "
        f"{cfg.shared or 'off'}; session form {cfg.form}, "
        f"{cfg.examples} examples; forgetting: {len(general_items)} general questions, "
        f"{len(reading_items)} reading items")

    lm = load_model(cfg.model, device=cfg.device)
    t0 = time.time()
    taught = teach(lm, conventions, cfg.form, cfg.examples, cfg.max_tokens)
    for t in taught:
        if cfg.review == "rule":
            t.review = review_messages(lm.tokenizer, t.convention.rule)
        elif cfg.review == "rule-after":
            t.feedback = review_turns(t.convention.rule)
        check_unseen(t)
    log(f"sessions built ({time.time() - t0:.0f} s): the session's own answers follow the "
        f"convention {sum(sum(t.session_follows) for t in taught)}/"
        f"{sum(len(t.session_follows) for t in taught)}")
    rows = {"base": lambda t: [], "in_context": lambda t: t.context,
            "memory": lambda t, tok=lm.tokenizer: memory_messages(tok, t.convention.rule)}
    if cfg.review != "none":  # what the teacher reads: does the review make it follow?
        rows["teacher"] = lambda t: t.teacher_context()
    by_id = {t.convention.id: t for t in taught}
    for name, ctx in rows.items():
        got = adherence(lm, conventions, cfg.max_tokens, lambda c, ctx=ctx: ctx(by_id[c.id]))
        for t in taught:
            setattr(t, name, got[t.convention.id][0])
            t.replies[name] = got[t.convention.id][1]
    for t in taught:
        t.context_tokens = context_tokens(lm.tokenizer, t.context)
        t.memory_tokens = context_tokens(lm.tokenizer, memory_messages(lm.tokenizer,
                                                                       t.convention.rule))
        log(f"  {t.convention.id:18s} ({t.form}) base {_rate(t.base):.0%}, in context "
            f"{_rate(t.in_context):.0%}, memory {_rate(t.memory):.0%}; "
            f"{len(t.practice)} practice prompts, session {t.context_tokens} tokens, memory "
            f"{t.memory_tokens} tokens")
    forgetting_base = forgetting(lm, reading_items, general_items)
    log(f"base forgetting probes: reading {forgetting_base['reading']:.1%}, general "
        f"{forgetting_base['general']:.1%}; {(time.time() - t0) / 60:.1f} min so far")
    del lm

    clock = _Clock(total, log)
    runs: list[dict] = []
    keep = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="conventions-"))
    keep.mkdir(parents=True, exist_ok=True)
    done = _finished(keep, cfg)
    if done:
        log(f"resuming: {len(done)} consolidations already done in {keep}")
    try:
        for t in taught:
            for method in cfg.methods:
                r = done.get((t.convention.id, method))
                runs.append(r)
                if r is not None:
                    clock.total -= 1  # the rate and ETA count what this run trains
                    log(f"  {t.convention.id} {method}: resumed (adherence {r['adherence']:.0%})")
                    continue
                r = _consolidate_one(cfg, t, method, reading_items, general_items,
                                     keep if method == "opsd" else None, log)
                _remember(keep, cfg, r)
                runs[-1] = r
                clock.tick(f"{t.convention.id} {method}: adherence {r['adherence']:.0%} (base "
                           f"{_rate(t.base):.0%}, in context {_rate(t.in_context):.0%}, memory "
                           f"{_rate(t.memory):.0%}), KL {r['cost']['kl_to_base']:.3f}, general "
                           f"{r['forgetting']['general']:.0%}, {r['cost']['seconds']:.0f} s")
        isolation = _isolation(cfg, taught, keep, log) if iso else {}
        chain = _retention(cfg, taught[:n_ret], reading_items, general_items, clock, log) \
            if n_ret else {}
        shared = _shared(cfg, shared_convention, keep, clock) if shared_convention else {}
    finally:
        if not cfg.work:
            shutil.rmtree(keep, ignore_errors=True)
    result = summarize(cfg, taught, runs, isolation, chain, forgetting_base,
                       {"general_items": len(general_items), "reading_items": len(reading_items)},
                       time.time() - started)
    result["shared"] = shared
    return result


def _settings_key(cfg: ConventionsConfig) -> str:
    """What a finished consolidation depends on (not the parts sized after it)."""
    keep = {k: v for k, v in asdict(cfg).items()
            if k not in ("conventions", "n", "methods", "isolation", "retention", "gate",
                         "shared", "work")}
    return json.dumps(keep, sort_keys=True, default=str)


def _finished(work: Path, cfg: ConventionsConfig) -> dict[tuple[str, str], dict]:
    """Consolidations a run with the same settings finished in `work` (opsd: adapter kept)."""
    path, key, out = work / "runs.jsonl", _settings_key(cfg), {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line)
        r = row["run"]
        if row["key"] == key and (r["method"] != "opsd" or Path(r["adapter"]).exists()):
            out[(r["convention"], r["method"])] = r
    return out


def _remember(work: Path, cfg: ConventionsConfig, run: dict) -> None:
    with (work / "runs.jsonl").open("a") as handle:
        handle.write(json.dumps({"key": _settings_key(cfg), "run": run}) + "\n")


def _consolidate_one(cfg: ConventionsConfig, t: Taught, method: str, reading_items,
                     general_items, keep: Path | None,
                     log: Callable[[str], None] | None = None) -> dict:
    lm = load_model(cfg.model, device=cfg.device)
    lesson = t.lesson()
    trainer, cost = train(cfg, lm, lesson, method, log=log)
    with trainer.frozen_student():
        got = adherence(lm, [t.convention], cfg.max_tokens)[t.convention.id]
        lost = forgetting(lm, reading_items, general_items)
    adapter = None
    if keep is not None:
        adapter = keep / t.convention.id / method
        save(lm.model, STUDENT, adapter, meta={"method": method, "bench": "conventions",
                                               "convention": t.convention.id})
        cost["adapter_bytes"] = adapter_bytes(adapter)
    return {"convention": t.convention.id, "method": method, "adherence": _rate(got[0]),
            "follows": got[0], "replies": got[1], "practice_prompts": len(lesson.probes),
            "forgetting": lost, "cost": cost, "adapter": str(adapter) if adapter else None}


def _isolation(cfg: ConventionsConfig, taught: Sequence[Taught], keep: Path,
               log: Callable[[str], None]) -> dict:
    """Tenant B = the next convention's tenant (in a ring): B's opsd adapter, served as the
    server would (use_adapter), answers A's eval prompts, scored for A's convention."""
    lm = load_model(cfg.model, device=cfg.device)
    lm.model.eval()
    pairs = []
    for k, a in enumerate(taught):
        b = taught[(k + 1) % len(taught)]
        with torch.no_grad():
            use_adapter(lm, keep / b.convention.id / "opsd")
            got = adherence(lm, [a.convention], cfg.max_tokens)[a.convention.id][0]
            use_adapter(lm, None)
        pairs.append({"a": a.convention.id, "b": b.convention.id, "b_on_a": _rate(got),
                      "base_a": _rate(a.base), "leak_pts": 100 * (_rate(got) - _rate(a.base))})
        log(f"  isolation: {b.convention.id}'s adapter on {a.convention.id}'s prompts follows "
            f"{a.convention.id} {_rate(got):.0%} (base {_rate(a.base):.0%})")
    return {"pairs": pairs, "leak_pts": _mean(p["leak_pts"] for p in pairs)}


def _retention(cfg: ConventionsConfig, taught: Sequence[Taught], reading_items, general_items,
               clock: _Clock, log: Callable[[str], None]) -> dict:
    """One tenant learns the conventions in order, each candidate the child of the active
    adapter; with the gate on, a candidate becomes active only if `decide` passes it: learned
    (held-back train prompts answered without context closer, in token F1, to the teacher's
    answers with the session), KL to base, in-context reading (the gate's retention set), the
    earlier conventions' held-back prompts, and the general questions the forgetting measure
    does not ask. After each round, adherence on every
    convention so far with the active adapter."""
    root = Path(tempfile.mkdtemp(prefix="conventions-chain-"))
    active: str | None = None
    adherence_rows, verdicts, costs = [], [], []
    earlier: list[tuple[Taught, list[str], list[str]]] = []  # (taught, held prompts, refs)
    lost: dict = {}
    try:
        for k, t in enumerate(taught):
            c = t.convention
            held = c.train[-GATE_HELD:]
            lesson = t.lesson(held_back=held)
            assert_unseen(held, lesson.probes)
            lm = load_model(cfg.model, device=cfg.device)
            _, cost = _gated_train(cfg, lm, t, lesson, held, active, earlier)
            verdict = cost.pop("verdict")
            promoted = verdict["promote"] or not cfg.gate
            where = root / f"v{k + 1}"
            if promoted:
                save(lm.model, STUDENT, where, meta={"bench": "conventions", "convention": c.id})
                active = str(where)
            earlier.append((t, held, cost.pop("refs")))
            row = _chain_adherence(cfg, [x.convention for x in taught[: k + 1]], active)
            adherence_rows.append(row)
            verdicts.append({"round": k + 1, "convention": c.id, "promoted": promoted, **verdict})
            costs.append(cost)
            if k == len(taught) - 1:
                lm = load_model(cfg.model, device=cfg.device)
                with torch.no_grad():
                    lm.model.eval()
                    use_adapter(lm, active)
                    lost = forgetting(lm, reading_items, general_items)
            clock.tick(f"retention round {k + 1} ({c.id}): "
                       f"{'promoted' if promoted else 'rejected'} ({verdict['reason']}); adherence "
                       + ", ".join(f"{x:.0%}" for x in row))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"conventions": [t.convention.id for t in taught], "adherence": adherence_rows,
            "base": [_rate(t.base) for t in taught],
            "in_context": [_rate(t.in_context) for t in taught], "verdicts": verdicts,
            "cost": costs, "forgetting": lost, "gate": cfg.gate}


def _gated_train(cfg, lm, t: Taught, lesson: Lesson, held: list[str], active: str | None,
                 earlier) -> tuple[Trainer, dict]:
    budget = _budget(t.convention, cfg.max_tokens)
    chats_held = [[_user(q)] for q in held]
    refs_chats = [[*t.context, _user(q)] for q in held]
    before_earlier_chats = [[_user(q)] for _, qs, _ in earlier for q in qs]
    earlier_refs = [r for _, _, refs in earlier for r in refs]
    earlier_budgets = [_budget(x.convention, cfg.max_tokens) for x, qs, _ in earlier for _ in qs]

    # The gate's general questions: those the bench's forgetting measure does not ask (the
    # gate must not select on the figures reported), all of them where it asks every one.
    gate_general = gate_general_set(general_set()[cfg.general_items or 0:]) or gate_general_set()

    def score(answers, refs):
        return _mean(f1(a, r) for a, r in zip(answers, refs, strict=True)) if refs else 0.0

    # The teacher view is the active adapter (the parent) or the base.
    lm.model.eval()
    with torch.no_grad():
        use_adapter(lm, active)
        refs = replies(lm, refs_chats, budget)
        before = score(replies(lm, chats_held, budget), refs)
        before_earlier = score(replies(lm, before_earlier_chats, earlier_budgets), earlier_refs)
        before_reading = reading_accuracy(lm)
        before_general = general_accuracy(lm, gate_general)
        use_adapter(lm, None)
    trainer, cost = train(cfg, lm, lesson, "opsd", parent=active)
    with trainer.frozen_student():
        after = score(replies(lm, chats_held, budget), refs)
        after_earlier = score(replies(lm, before_earlier_chats, earlier_budgets), earlier_refs)
        after_reading = reading_accuracy(lm)
        after_general = general_accuracy(lm, gate_general)
    verdict = decide(GateConfig(), gain=after - before, kl=cost["kl_to_base"],
                     retention_drop=before_reading - after_reading,
                     earlier_drop=(before_earlier - after_earlier) if earlier else 0.0,
                     general_drop=before_general - after_general)
    cost["verdict"] = {"promote": verdict.promote, "reason": verdict.reason,
                       "gain": after - before, "earlier_drop": verdict.metrics["earlier_drop"],
                       "retention_drop": verdict.metrics["retention_drop"],
                       "general_drop": verdict.metrics["general_drop"]}
    cost["refs"] = refs
    return trainer, cost


def _shared(cfg: ConventionsConfig, c: Convention, keep: Path, clock: _Clock) -> dict:
    """The shared-adapter part (module docstring)."""
    from dataclasses import replace

    from onthejob.serve.turns import AdapterResolver
    from onthejob.store import Store

    thirds = [c.train[i::3] for i in range(3)]
    teachers = [replace(c, train=third) for third in thirds]
    lm = load_model(cfg.model, device=cfg.device)
    taught = teach(lm, teachers, "statement", cfg.examples, cfg.max_tokens)
    for t in taught:
        check_unseen(t)
    base = adherence(lm, [c], cfg.max_tokens)[c.id][0]
    in_context = adherence(lm, [c], cfg.max_tokens, lambda _c: taught[0].context)[c.id][0]
    lessons = [replace(t.lesson(), session_id=f"shared-{k}") for k, t in enumerate(taught)]
    t0 = time.time()
    with PeakMemory(lm.device):
        steps = steps_for_visits(planned_probes(lessons, cfg.opsd), cfg.visits, cfg.opsd)
        bf16 = native_bf16(lm.device) if cfg.bf16 is None else cfg.bf16
        trainer = Trainer(lm, TrainConfig(steps=steps, lr=cfg.lr, seed=cfg.seed, bf16=bf16))
        trainer.run(Opsd(lessons, list(TRAINING_ANCHORS), cfg.opsd, avoid=eval_prompts()))
        kl = AnchorDrift()(trainer)
    where = keep / "shared" / "v1"
    digest = save(lm.model, STUDENT, where, meta={"bench": "conventions", "scope": "shared"})
    store = Store(f"sqlite:///{keep / 'shared.db'}")
    try:
        for name, allow in (("teacher-a", True), ("teacher-b", True), ("teacher-c", True),
                            ("allows", True), ("declines", False)):
            store.create_tenant(name, allow_shared=allow)
        adapter = store.add_adapter("shared", None, method="opsd", path=str(where),
                                    checksum=digest)
        store.activate_adapter(adapter.id, reason="conventions bench: shared part")
        resolver = AdapterResolver(store)
        served = {}
        lm = load_model(cfg.model, device=cfg.device)
        lm.model.eval()
        for name in ("allows", "declines"):
            paths = resolver.paths(store.get_tenant(name))
            with torch.no_grad():
                use_adapter(lm, paths or None)
                got = adherence(lm, [c], cfg.max_tokens)[c.id][0]
                use_adapter(lm, None)
            served[name] = {"adapters": len(paths), "adherence": _rate(got)}
    finally:
        store.close()
    out = {"convention": c.id, "base": _rate(base), "in_context": _rate(in_context),
           "allows": served["allows"], "declines": served["declines"],
           "practice_prompts": sum(len(x.probes) for x in lessons), "steps": steps,
           "kl_to_base": kl, "seconds": time.time() - t0}
    clock.tick(f"shared adapter ({c.id}, 3 teaching tenants): a tenant that allows shared "
               f"learning {out['allows']['adherence']:.0%}, one that declines "
               f"{out['declines']['adherence']:.0%} (base {out['base']:.0%})")
    return out


def _chain_adherence(cfg: ConventionsConfig, conventions: Sequence[Convention],
                     active: str | None) -> list[float]:
    lm = load_model(cfg.model, device=cfg.device)
    lm.model.eval()
    with torch.no_grad():
        use_adapter(lm, active)
        got = adherence(lm, conventions, cfg.max_tokens)
    return [_rate(got[c.id][0]) for c in conventions]


# -- summary ------------------------------------------------------------------------------------


def summarize(cfg: ConventionsConfig, taught: Sequence[Taught], runs: list[dict],
              isolation: dict, chain: dict, forgetting_base: dict, sizes: dict,
              seconds: float) -> dict:
    base = _mean(_rate(t.base) for t in taught)
    ceiling = _mean(_rate(t.in_context) for t in taught)
    methods = {}
    for m in cfg.methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        after = _mean(r["adherence"] for r in rs)
        methods[m] = {
            "adherence": after,
            "vs_in_context": after / ceiling if ceiling > 0 else float("nan"),
            "general_drop_pts": 100 * (forgetting_base["general"]
                                       - _mean(r["forgetting"]["general"] for r in rs)),
            "reading_drop_pts": 100 * (forgetting_base["reading"]
                                       - _mean(r["forgetting"]["reading"] for r in rs)),
            "kl_to_base": _mean(r["cost"]["kl_to_base"] for r in rs),
            "seconds": _mean(r["cost"]["seconds"] for r in rs),
            "peak_mb": max(r["cost"]["peak_mb"] for r in rs),
            "tokens_student": _mean(r["cost"]["tokens_student"] for r in rs),
            "tokens_teacher": _mean(r["cost"]["tokens_teacher"] for r in rs)}
    per = []
    for t in taught:
        c = t.convention
        row = {"id": c.id, "kind": c.kind, "form": t.form, "base": _rate(t.base),
               "in_context": _rate(t.in_context), "memory": _rate(t.memory),
               "teacher": _rate(t.teacher) if t.teacher else None,
               "session_follows": t.session_follows, "practice_prompts": len(t.practice),
               "context_tokens": t.context_tokens, "memory_tokens": t.memory_tokens,
               "eval_prompts": len(c.eval), "session": t.context, "replies": t.replies,
               "methods": {}}
        for r in runs:
            if r["convention"] == c.id:
                row["methods"][r["method"]] = {k: v for k, v in r.items()
                                               if k not in ("convention", "method", "adapter")}
        per.append(row)
    retention_after = None
    if chain and len(chain["adherence"]) > 1 and chain["adherence"][0][0] > 0:
        retention_after = chain["adherence"][-1][0] / chain["adherence"][0][0]
    return {"config": {**asdict(cfg), "methods": list(cfg.methods),
                       "conventions": [t.convention.id for t in taught]},
            "conventions": per, "base": base, "in_context": ceiling,
            "memory": _mean(_rate(t.memory) for t in taught),
            "teacher": _mean(_rate(t.teacher) for t in taught) if cfg.review != "none" else None,
            "memory_tokens": _mean(t.memory_tokens for t in taught),
            "context_tokens": _mean(t.context_tokens for t in taught),
            "methods": methods, "isolation": isolation, "retention": chain,
            "retention_first": retention_after,
            "forgetting_base": forgetting_base, "sizes": sizes, "seconds": seconds,
            "date": date.today().isoformat()}


def headlines(result: dict) -> list[str]:
    """The headline lines of issue 16 (adherence in %)."""
    def pct(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    m = result["methods"]
    lines = [f"conventions adherence base: {pct(result['base'])}",
             f"conventions adherence in context: {pct(result['in_context'])}",
             f"conventions adherence memory: {pct(result['memory'])}"]
    for name in METHODS:
        if name in m:
            lines.append(f"conventions adherence {name}: {pct(m[name]['adherence'])}")
    if result["isolation"]:
        lines.append(f"conventions leak pts: {result['isolation']['leak_pts']:+.1f}")
    if result["retention"]:
        n = len(result["retention"]["conventions"]) - 1
        lines.append(f"conventions retention after {n}: {pct(result['retention_first'])}")
    if result.get("shared"):
        sh = result["shared"]
        lines.append(f"conventions shared adherence: {pct(sh['allows']['adherence'])} "
                     f"(declining tenant {pct(sh['declines']['adherence'])}, base "
                     f"{pct(sh['base'])})")
    return lines
