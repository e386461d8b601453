"""What a consolidation will cost, before it runs (`onthejob consolidate --dry-run`).

The work is counted from the sessions themselves, without the model writing anything: their
context tokens, the practice prompts made by rule, the sentences and answer spans the model
would write a question for (learn/practice.py), hence the training probes, the steps the
visits budget gives, the teacher's answers and the gate's items. The time per unit of work
comes from the last finished consolidation of the same method in this store (its phases'
measured seconds, `rates` in its run row) or, on a store that never ran one, from a
calibration on this machine just now (a batch of 16 decoding after a short prompt and after a
session of the sessions' mean length, and one forward pass). It is an
estimate and says which rates it used; `onthejob runs show RUN` shows the real figures after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from onthejob.learn.drift import TRAINING_ANCHORS
from onthejob.learn.gate import gate_general_set, retention_set
from onthejob.learn.lesson import teacher_context
from onthejob.learn.opsd import steps_for_visits
from onthejob.learn.practice import material, practice_prompts, sentences_of
from onthejob.model import LoadedModel, SamplingParams, generate, render_ids
from onthejob.store import Store
from onthejob.store.types import Session

GATE_TOKENS = 24  # the gate's answers (learn/evaluate.py)
WRITE_TOKENS = 32  # a model-written practice question
TRAIN_STEP_FORWARDS = 5  # a training step's time in forward passes of the same rows (measured)


@dataclass
class Plan:
    seconds: float
    parts: dict  # phase -> {"seconds", "units", "unit"}
    text: str


def count_work(lm: LoadedModel, store: Store, sessions: Sequence[Session], opts) -> dict:
    """The units of work of a consolidation, counted without generating anything."""
    from onthejob.learn.consolidate import MIN_HELD_OUT  # consolidate imports this module

    tokens = rule = written = held = sentences = reviewed = 0
    for s in sessions:
        review = store.get_review(s.tenant, s.id)
        reviewed += bool(review and review.text.strip())
        context = teacher_context(store.messages(s.tenant, s.id), review.text if review else "")
        tokens += len(render_ids(lm.tokenizer, context, add_generation_prompt=False))
        made = practice_prompts(None, context, opts.probe_kinds)  # the rule-made kinds only
        units = sum(p.kind == "rule" for p in made)
        n_sent = len(sentences_of(material(context)))
        # Upper bounds: the model writes one question per answer span and one per sentence
        # (some do not parse and are dropped).
        model_made = units * ("span" in opts.probe_kinds) + n_sent * ("question" in opts.probe_kinds)
        rule += len(made)
        written += model_made
        sentences += n_sent
        held += max(MIN_HELD_OUT, round(units * opts.held_out_share)) if units > 1 and opts.held_out_share else 0
    # with --review-prompts, that many more a reviewed session (upper bound: some are dropped)
    review_prompts = opts.opsd.review_prompts * reviewed if opts.method == "opsd" else 0
    probes = max(rule + written - held + review_prompts, 1)
    steps = opts.train.steps
    if opts.visits:
        from onthejob.learn.consolidate import MAX_AUTO_STEPS

        steps = min(steps_for_visits(probes, opts.visits, opts.opsd), MAX_AUTO_STEPS)
    opsd = opts.method == "opsd"
    teacher = probes * (1 + opts.opsd.teacher_samples) if opsd and opts.opsd.teacher_mix > 0 else 0
    anchors = (len(TRAINING_ANCHORS) + opts.opsd.self_anchors
               + opts.opsd.reading_anchors * len(sessions)) if opsd else 0
    return {"sessions": len(sessions), "context_tokens": tokens, "rule_prompts": rule,
            "written_prompts": written, "sentences": sentences, "probes": probes, "held": held,
            "steps": steps, "teacher_answers": teacher, "anchor_answers": anchors,
            "gate_items": held + len(retention_set()) + len(gate_general_set())}


def calibrate(lm: LoadedModel, rows: int = 16, context_tokens: int = 0, length: int = 72,
              bf16: bool = False) -> dict:
    """Measured now on this machine: seconds per decoding step at batch `rows` after a short
    prompt; a teacher batch (`rows` questions after one session of `context_tokens` tokens,
    shared): its fixed cost (the prefill) and its cost per decoded token, from two lengths;
    and one forward pass over `rows` x `length` tokens (in bf16 autocast where training uses it)."""
    tok = lm.tokenizer
    prompt = render_ids(tok, [{"role": "user", "content": "Name a city in Norway."}])
    generate(lm, [prompt], SamplingParams(max_tokens=2))  # one-time costs: not timed
    t0 = time.time()
    generate(lm, [prompt] * rows, SamplingParams(max_tokens=16, ignore_eos=True))
    decode = (time.time() - t0) / 16
    out = {"decode_s_per_step": decode, "rows": rows, "teacher_fixed_s": 0.0,
           "teacher_s_per_token": decode}
    if context_tokens > 0:
        words = "The harbour authority signed a contract for forty terminals in Bergen.".split()
        text = []
        while len(tok.encode(" ".join(text))) < context_tokens:
            text += words
        session = [{"role": "user", "content": " ".join(text)}, {"role": "assistant", "content": "Noted."}]
        prompts = [render_ids(tok, [*session, {"role": "user", "content": f"Question {i}?"}])
                   for i in range(rows)]
        times = []
        for n in (2, 10):
            t0 = time.time()
            generate(lm, prompts, SamplingParams(max_tokens=n, ignore_eos=True))
            times.append(time.time() - t0)
        per_token = max((times[1] - times[0]) / 8, 0.0)
        out["teacher_s_per_token"] = per_token
        out["teacher_fixed_s"] = max(times[0] - 2 * per_token, 0.0)
    ids = torch.full((rows, length), tok.eos_token_id or 0, dtype=torch.long, device=lm.device)
    with torch.no_grad(), torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=bf16):
        lm.model(input_ids=ids[:1, :8])
        t0 = time.time()
        lm.model(input_ids=ids)
        out["forward_s"] = time.time() - t0
    return out


def _latest_rates(store: Store, method: str) -> tuple[dict, int | None]:
    for run in store.list_runs(kind="consolidate", status="done", limit=50):
        rates = run.progress.get("rates") or {}
        if run.params.get("method") == method and "s_per_step" in rates:
            return rates, run.id
    return {}, None


def estimate(store: Store, lm: LoadedModel, sessions: Sequence[Session], opts) -> Plan:
    work = count_work(lm, store, sessions, opts)
    rates, run_id = _latest_rates(store, opts.method)
    batch = opts.opsd.batch
    if run_id is not None:
        source = f"rates measured by run {run_id} in this store"
        practice = work["written_prompts"] * rates.get("practice_s_per_prompt", 0.0)
        teacher = work["teacher_answers"] * rates.get("teacher_s_per_answer", 0.0)
        training = work["steps"] * rates["s_per_step"]
        gate = 2 * rates.get("gate_after_s", 0.0)
    else:
        from onthejob.model.decoder import native_bf16

        bf16 = native_bf16(lm.device) if opts.train.bf16 is None else opts.train.bf16
        context = work["context_tokens"] // max(work["sessions"], 1)
        cal = calibrate(lm, rows=batch, context_tokens=context, bf16=bf16)
        step_s, fwd = cal["decode_s_per_step"], cal["forward_s"]
        source = (f"calibrated just now on this machine: a decoding step of {batch} rows "
                  f"{step_s * 1000:.0f} ms; {batch} teacher rows after a {context}-token "
                  f"session {cal['teacher_fixed_s']:.2f} s + {cal['teacher_s_per_token'] * 1000:.0f}"
                  f" ms a token; a forward pass of {batch} x 72 tokens {fwd:.2f} s")
        # The writers decode in batches of 8 after a few-shot prompt of ~300 tokens.
        practice = math.ceil(work["written_prompts"] / 8) * (WRITE_TOKENS * step_s + 2 * fwd)
        # Teacher rows are batched per session (the shared context encoded once a batch).
        gen = work["teacher_answers"] + work["anchor_answers"]
        teacher = (math.ceil(gen / batch) + work["sessions"]) * (
            cal["teacher_fixed_s"] + opts.opsd.teacher_tokens * cal["teacher_s_per_token"])
        # A training step (forward and backward of 16 rows, the optimizer, the LoRA and the
        # teacher's top-k) measured 5.2-5.8 forward passes of 16 x 72 tokens on this 2-core
        # CPU (the nightly runs of 2026-12-02, docs/RESULTS.md): 5 is the rule of thumb.
        per_step = TRAIN_STEP_FORWARDS * fwd * max(opts.opsd.prompts_per_step / batch, 1)
        if opts.method == "opsd" and (opts.opsd.teacher_mix < 1 or opts.opsd.on_policy_from < 1):
            per_step += opts.opsd.max_new_tokens * step_s + fwd  # the student samples, the teacher scores
        training = work["steps"] * per_step
        gate = 2 * math.ceil(work["gate_items"] / 8) * (GATE_TOKENS * step_s + fwd)
    parts = {"practice material": {"seconds": practice, "units": work["written_prompts"],
                                   "unit": "model-written prompts"},
             "teacher answers and anchors": {"seconds": teacher,
                                             "units": work["teacher_answers"] + work["anchor_answers"],
                                             "unit": "answers"},
             "training": {"seconds": training, "units": work["steps"], "unit": "steps"},
             "gate": {"seconds": gate, "units": work["gate_items"], "unit": "items, before and after"}}
    total = sum(p["seconds"] for p in parts.values())
    detail = ", ".join(f"{name} ~{p['seconds'] / 60:.1f} min ({p['units']} {p['unit']})"
                       for name, p in parts.items())
    text = (f"plan: {work['sessions']} session(s), {work['context_tokens']} context tokens, about "
            f"{work['probes']} training probes and {work['held']} held back; {work['steps']} steps "
            f"at lr {opts.train.lr}. Estimate: about {total / 60:.1f} min ({detail}); {source}. "
            "An estimate from token counts, not a promise. Nothing was trained.")
    return Plan(total, {**parts, "work": work}, text)
