"""On-policy self-distillation (OPSD), the default learning rule.

Teacher = the model with the session in its context; student = the model without it.
Each step:
  1. pick student prompts: probes of the lessons (replayed user turns, self-written probes)
     and anchor prompts (ordinary requests, whose answers must not change);
  2. the student samples its own answers (on-policy); with probability `teacher_mix` a row
     uses an answer the teacher sampled with the context instead (GKD's mixture, which lets
     the student see good answers early, when its own are all wrong);
  3. the teacher scores exactly those tokens with the session in front of them (its KV cache
     computed once per session and reused);
  4. loss = mean over response tokens of D(student || teacher) over the vocabulary
     (reverse KL by default; forward KL or generalized JSD; optionally the teacher's top-k).
     Anchor rows are scored, by default, by the model as it was before the run without the
     session: on ordinary prompts the loss is then a KL penalty toward the prior model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from onthejob.learn.divergence import per_token
from onthejob.learn.lesson import Lesson, check_fits
from onthejob.learn.loop import Trainer, report_rate
from onthejob.learn.scoring import Prefix, encode_prefix, response_logits
from onthejob.model import SamplingParams, generate, render_ids
from onthejob.model.chat import end_of_turn_ids

ANCHOR_TARGETS = ("prior", "teacher")


@dataclass
class OpsdConfig:
    divergence: str = "reverse_kl"
    beta: float = 0.5
    top_k: int | None = None
    prompts_per_step: int = 8
    samples_per_prompt: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    teacher_mix: float = 0.5
    teacher_pool: int = 2  # teacher samples drawn once per probe for the mixture
    anchor_share: float = 0.25
    # What anchor rows are pulled toward: "prior" = the model as it was before this run,
    # without the session (the parent adapters, or the base): a KL penalty that holds
    # ordinary answers in place; "teacher" = the teacher with the session in context.
    anchor_target: str = "prior"

    def __post_init__(self) -> None:
        if self.anchor_target not in ANCHOR_TARGETS:
            raise ValueError(f"unknown anchor target {self.anchor_target!r}; choose one of "
                             f"{', '.join(ANCHOR_TARGETS)}")


@dataclass
class _Probe:
    lesson: int  # index into lessons; anchors borrow a lesson's context as the teacher's
    text: str
    student_ids: list[int]
    teacher_suffix: list[int]
    anchor: bool = False


def common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


class Opsd:
    name = "opsd"

    def __init__(self, lessons: Sequence[Lesson], anchors: Sequence[str], cfg: OpsdConfig | None = None):
        if not lessons:
            raise ValueError("OPSD needs at least one lesson")
        self.lessons, self.anchors = list(lessons), list(anchors)
        self.cfg = cfg or OpsdConfig()
        self.prefixes: list[Prefix] = []
        self.probes: list[_Probe] = []
        self.pool: dict[int, list[list[int]]] = {}
        self.tokens_student = 0
        self.tokens_teacher = 0

    # -- preparation: encode each session once, render every probe twice, check alignment ----
    def prepare(self, trainer: Trainer) -> None:
        lm, tok = trainer.lm, trainer.lm.tokenizer
        self._eot = min(end_of_turn_ids(tok) - {None})
        system_len = _system_prefix_len(tok)
        with trainer.teacher():
            for index, lesson in enumerate(self.lessons):
                check_fits(lm, lesson, room=64 + self.cfg.max_new_tokens)
                context_ids = render_ids(tok, lesson.context, add_generation_prompt=False)
                self.prefixes.append(encode_prefix(lm, context_ids))
                self.tokens_teacher += len(context_ids)
                for text in lesson.probes:
                    self.probes.append(self._probe(tok, index, lesson, context_ids, text, system_len))
        for j, text in enumerate(self.anchors):
            index = j % len(self.lessons)
            context_ids = self.prefixes[index].ids
            probe = self._probe(tok, index, self.lessons[index], context_ids, text, system_len)
            probe.anchor = True
            self.probes.append(probe)
        if not any(not p.anchor for p in self.probes):
            raise ValueError("the lessons have no probes: nothing to learn from")
        if self.cfg.teacher_mix > 0:
            self._fill_pool(trainer)

    def _probe(self, tok, index: int, lesson: Lesson, context_ids: list[int], text: str,
               system_len: int) -> _Probe:
        user = [{"role": "user", "content": text}]
        student_ids = render_ids(tok, user)
        full = render_ids(tok, [*lesson.context, *user])
        if full[: len(context_ids)] != context_ids:
            raise AssertionError("the session's context does not render as a prefix of the teacher prompt")
        # The trap: teacher and student must see the probe turn (and so the answer) with the
        # same chat template and the same token ids.
        if common_suffix(full, student_ids) < len(student_ids) - system_len:
            raise AssertionError("teacher and student render the probe turn differently")
        return _Probe(index, text, student_ids, full[len(context_ids):])

    def _fill_pool(self, trainer: Trainer) -> None:
        lm = trainer.lm
        params = SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                seed=trainer.cfg.seed + 1)
        rows = [(i, p) for i, p in enumerate(self.probes) if not p.anchor]
        started = time.time()
        with trainer.teacher():
            for start in range(0, len(rows), 8):
                if start and (start // 8) % 4 == 0:
                    report_rate("teacher answers for the mixture", "probes", start, len(rows), started)
                chunk = rows[start: start + 8]
                prompts = [self.prefixes[p.lesson].ids + p.teacher_suffix
                           for _, p in chunk for _ in range(self.cfg.teacher_pool)]
                outs = generate(lm, prompts, params)
                for k, (i, _) in enumerate(chunk):
                    group = outs[k * self.cfg.teacher_pool: (k + 1) * self.cfg.teacher_pool]
                    self.pool[i] = [self._with_eot(o) for o in group]
                    self.tokens_teacher += sum(len(o.prompt_ids) + len(o.token_ids) for o in group)

    def _with_eot(self, completion) -> list[int]:
        ids = list(completion.token_ids)
        return ids + [self._eot] if completion.finish_reason == "stop" else ids

    # -- one step ----------------------------------------------------------------------------
    def step(self, trainer: Trainer, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, rng, lm = self.cfg, trainer.rng, trainer.lm
        lesson_probes = [i for i, p in enumerate(self.probes) if not p.anchor]
        anchor_probes = [i for i, p in enumerate(self.probes) if p.anchor]
        n_anchor = round(cfg.prompts_per_step * cfg.anchor_share) if anchor_probes else 0
        chosen = [rng.choice(lesson_probes) for _ in range(cfg.prompts_per_step - n_anchor)]
        chosen += [rng.choice(anchor_probes) for _ in range(n_anchor)]
        rows = [i for i in chosen for _ in range(cfg.samples_per_prompt)]
        from_teacher = [i in self.pool and rng.random() < cfg.teacher_mix for i in rows]

        params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                seed=trainer.cfg.seed * 100003 + step)
        on_policy = [i for i, t in zip(rows, from_teacher, strict=True) if not t]
        with trainer.frozen_student():
            sampled = iter(generate(lm, [self.probes[i].student_ids for i in on_policy], params)) \
                if on_policy else iter(())
        responses = []
        for i, t in zip(rows, from_teacher, strict=True):
            responses.append(rng.choice(self.pool[i]) if t else self._with_eot(next(sampled)))
        keep = [k for k, r in enumerate(responses) if r]
        rows = [rows[k] for k in keep]
        responses = [responses[k] for k in keep]

        teacher_logits = self._teacher_logits(trainer, rows, responses)
        student_logits = response_logits(lm, [self.probes[i].student_ids for i in rows], responses)
        losses = per_token(student_logits, teacher_logits, cfg.divergence, cfg.beta, cfg.top_k)
        n_tokens = sum(len(r) for r in responses)
        self.tokens_student += sum(len(self.probes[i].student_ids) for i in rows) + n_tokens
        return losses.mean(), {
            "kl": float(losses.detach().mean()),
            "resp_len": n_tokens / max(len(responses), 1),
            "teacher_rows": sum(from_teacher) / max(len(from_teacher), 1),
        }

    def _teacher_logits(self, trainer: Trainer, rows: list[int],
                        responses: list[list[int]]) -> torch.Tensor:
        # One pass per session, each reusing that session's cached prefix, and one pass without
        # any session for anchors pulled toward the prior; back in row order.
        prior = self.cfg.anchor_target == "prior"
        by_lesson: dict[int, list[int]] = {}
        for k, i in enumerate(rows):
            probe = self.probes[i]
            by_lesson.setdefault(-1 if prior and probe.anchor else probe.lesson, []).append(k)
        parts: dict[int, torch.Tensor] = {}
        with trainer.teacher():
            for lesson, ks in by_lesson.items():
                prompts = [self.probes[rows[k]].student_ids if lesson < 0
                           else self.probes[rows[k]].teacher_suffix for k in ks]
                logits = response_logits(trainer.lm, prompts, [responses[k] for k in ks],
                                         prefix=None if lesson < 0 else self.prefixes[lesson])
                self.tokens_teacher += sum(len(p) + len(responses[k]) for p, k in zip(prompts, ks, strict=True))
                offset = 0
                for k in ks:
                    parts[k] = logits[offset: offset + len(responses[k])]
                    offset += len(responses[k])
        return torch.cat([parts[k] for k in range(len(rows))])


def _system_prefix_len(tok) -> int:
    """Tokens the template puts before the first user turn (a default system prompt)."""
    a = render_ids(tok, [{"role": "user", "content": "a"}])
    b = render_ids(tok, [{"role": "user", "content": "b"}])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
