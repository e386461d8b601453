"""On-policy self-distillation (OPSD), the default learning rule.

Teacher = the model with the session in its context; student = the model without it.

Preparation (once per run):
  1. encode each session once into a KV cache (the teacher's prefix) and render every probe
     twice, as the student sees it and after the session, checking that both give the same
     answer token ids (the template trap);
  2. teacher targets, computed once: the teacher answers every probe (greedy, plus
     `teacher_samples` samples at `teacher_temperature`, up to `teacher_tokens` tokens); where
     the probe asks for a known span (learn/practice.py), answers that miss it are dropped,
     and when none is left the span itself is the answer (`span_fallback`); the session's
     own answer to a replayed turn is one more teacher sample. The teacher then scores each
     answer once, with the session cached in front, and keeps its top-k log-probs per token.
     Where the server kept the session's own answer (its token ids and top-k at each token,
     store/logprobs.py), that row is taken from the store instead of being scored again
     (`counts`: "reused" against "scored", and "teacher_tokens_saved"). Those values were
     computed with the session *up to that turn* in context (what the model saw when it
     answered), not with the whole session and the replayed turn after it, which is what
     the teacher sees when it scores: for the turn's own answer the two differ only by what
     came later in the session, and the issue asks for exactly this reuse (inference compute
     feeding learning). They are reused only when they are what scoring would be given that
     context: the same adapters served them as the teacher runs with (learn/lesson.py
     `kept_answers`), the tokens decode to the stored answer, the answer ended on an
     end-of-turn token (whose step's row is kept) and at least top_k alternatives were kept;
  3. anchor targets, also once: ordinary prompts (the fixed ones, `self_anchors` more that
     the base model writes itself, learn/self_anchors.py, and in-context reading of the
     session's own sentences) answered greedily by the model the anchors hold to (`anchor_target`:
     the base, by default, so that drift cannot compound over versions) and scored by it.

Each step:
  4. the next `prompts_per_step` probes in visit order (every probe once before any twice;
     a budget is a number of visits, `steps_for_visits`), `anchor_share` of them anchors;
  5. rows: a stored teacher answer (teacher rows, the default), or the student's own sample
     (on-policy rows: with probability 1 - `teacher_mix`, or every row once `on_policy_from`
     of the steps are done), which the teacher scores live with the session in front;
  6. loss = mean over lesson rows of (mean over the row's answer tokens of D, plus
     `label_weight` x the cross-entropy on the stored answer's own tokens) + `anchor_weight`
     x the same over anchor rows, D the divergence between the student's next-token
     distribution and the teacher's: forward KL by default (it can raise a token the student
     gives ~0 probability; reverse KL on the student's samples cannot), reverse KL or
     generalized JSD as options.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onthejob.learn.divergence import per_token, per_token_top
from onthejob.learn.evaluate import contains
from onthejob.learn.lesson import Lesson, check_fits, review_lesson
from onthejob.learn.loop import Trainer
from onthejob.learn.practice import PracticePrompt, anchors, informative, material
from onthejob.learn.scoring import Prefix, encode_prefix, response_logits
from onthejob.learn.self_anchors import self_written
from onthejob.model import SamplingParams, generate, render_ids
from onthejob.model.chat import end_of_turn_ids
from onthejob.store.logprobs import decode as decode_kept

ANCHOR_TARGETS = ("base", "prior", "teacher")
TEACHER_FROM = ("parent", "base")


@dataclass
class OpsdConfig:
    divergence: str = "forward_kl"
    beta: float = 0.5
    top_k: int | None = 32  # teacher log-probs kept per answer token (None: full vocabulary, live)
    # Take the session's own answers' teacher rows from the log-probs the server kept with
    # them, where usable, instead of scoring them again (False: score them, to measure).
    reuse_kept: bool = True
    prompts_per_step: int = 16
    samples_per_prompt: int = 1  # student samples per on-policy prompt
    max_new_tokens: int = 32  # length of each student sample
    temperature: float = 1.0  # the student's sampling temperature
    teacher_mix: float = 1.0  # share of lesson rows that are stored teacher answers
    on_policy_from: float = 1.0  # after this share of the steps every row is on-policy
    teacher_samples: int = 1  # teacher samples per probe beside its greedy answer
    teacher_temperature: float = 0.7
    teacher_tokens: int = 32
    span_fallback: bool = True  # the known span as the answer when every teacher answer misses it
    # Teacher answers to open prompts (no known span) kept only where they name a fact of the
    # session that the prompt does not and do not loop (learn/practice.py `informative`); the
    # session's own answer to a replayed turn likewise. False: every answer is kept.
    informative_only: bool = False
    anchor_share: float = 0.25
    anchor_weight: float = 1.0
    # Cross-entropy on the stored answer's own tokens, added with this weight to the divergence
    # on lesson rows (not anchors): forward KL to an unsure teacher leaves the student as unsure,
    # so its greedy answer may still miss the fact; the label term makes the kept answer (which
    # contains the known span, or is the span) the student's own. 0: the divergence alone.
    label_weight: float = 0.0
    # Anchor prompts the base model writes itself (learn/self_anchors.py), beside the fixed
    # ones: so many more ordinary prompts held still that the adapter cannot keep the fixed
    # ones and drift everywhere else. 0: the fixed anchors only.
    self_anchors: int = 0
    # The review's words taught as an instruction (learn/lesson.py `review_lesson`): for each
    # session whose review has words, this many ordinary prompts the base model writes itself,
    # answered by the teacher that reads only the review in its system prompt. 0: the review's
    # words are read only after the session, as part of its teacher's context.
    review_prompts: int = 0
    # What anchor rows are pulled toward: "base" = the model without any adapter (no drift
    # compounds from version to version); "prior" = the model as it was before this run,
    # without the session (parent adapters); "teacher" = the teacher with the session.
    anchor_target: str = "base"
    # Who reads the session as the teacher: "parent" = the model as it was before this run
    # (its adapters) with the session in context; "base" = the base model with it (only the
    # frozen shared adapter below, if any): a parent's drift, e.g. worse in-context reading,
    # then does not pass into the new version's targets.
    teacher_from: str = "parent"
    reading_anchors: int = 2  # per session: in-context reading of its own sentences
    batch: int = 16  # generation and scoring batch in preparation

    def __post_init__(self) -> None:
        if self.anchor_target not in ANCHOR_TARGETS:
            raise ValueError(f"unknown anchor target {self.anchor_target!r}; choose one of "
                             f"{', '.join(ANCHOR_TARGETS)}")
        if self.teacher_from not in TEACHER_FROM:
            raise ValueError(f"unknown teacher {self.teacher_from!r}; choose one of "
                             f"{', '.join(TEACHER_FROM)}")
        if not 0.0 <= self.teacher_mix <= 1.0 or not 0.0 <= self.on_policy_from <= 1.0:
            raise ValueError("teacher_mix and on_policy_from must be between 0 and 1")
        if self.label_weight < 0:
            raise ValueError(f"label_weight must be >= 0 (got {self.label_weight})")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0 (got {self.anchor_weight})")


def planned_probes(lessons: Sequence[Lesson], cfg: OpsdConfig) -> int:
    """The lesson probes OPSD will train on: the lessons' own and, with `review_prompts`,
    that many more for each lesson whose review has words (for a budget in visits)."""
    return sum(len(x.probes) for x in lessons) + cfg.review_prompts * sum(
        1 for x in lessons if x.review.strip())


def steps_for_visits(n_probes: int, visits: float, cfg: OpsdConfig) -> int:
    """Steps that give each of `n_probes` lesson probes about `visits` visits."""
    per_step = cfg.prompts_per_step - round(cfg.prompts_per_step * cfg.anchor_share)
    return max(1, math.ceil(n_probes * visits / max(per_step, 1)))


@dataclass
class _Probe:
    lesson: int  # index into lessons (anchors borrow a lesson's context for anchor_target="teacher")
    prompt: PracticePrompt
    student_ids: list[int]
    teacher_suffix: list[int]
    anchor: bool = False


@dataclass
class _Target:
    """One stored answer and the teacher's top-k log-probs at each of its tokens."""

    response: list[int]
    top_ids: torch.Tensor  # [T, k]
    top_logprobs: torch.Tensor  # [T, k]


def common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


class Opsd:
    name = "opsd"

    def __init__(self, lessons: Sequence[Lesson], anchors: Sequence[str], cfg: OpsdConfig | None = None,
                 avoid: Sequence[str] = ()):
        """`avoid`: evaluation prompts that self-written anchors (OpsdConfig.self_anchors) must
        not resemble, beside the general questions and drift anchors they never resemble."""
        if not lessons:
            raise ValueError("OPSD needs at least one lesson")
        self.lessons, self.anchors, self.avoid = list(lessons), list(anchors), list(avoid)
        self.self_written: list[str] = []
        self.review_written: list[str] = []
        self.cfg = cfg or OpsdConfig()
        self.prefixes: list[Prefix] = []
        self.probes: list[_Probe] = []
        self.targets: dict[int, list[_Target]] = {}
        self.queues: dict[bool, list[int]] = {False: [], True: []}
        # reused / scored: teacher rows taken from the store / teacher-forced here; given_scored:
        # session answers scored because no usable kept log-probs came with them; teacher
        # tokens saved / scored: what the reused rows would have cost to score (the probe
        # turn and the answer, after the cached session) / what scoring the others did cost.
        self.counts = {"teacher_answers": 0, "kept": 0, "missed_span": 0, "span_fallback": 0, "uninformative": 0,
                       "given": 0, "reused": 0, "scored": 0, "given_scored": 0,
                       "teacher_tokens_saved": 0, "teacher_tokens_scored": 0,
                       "self_anchors": 0, "self_anchors_dropped": 0, "review_prompts": 0}
        self.tokens_student = 0
        self.tokens_teacher = 0

    def _teacher(self, trainer: Trainer):
        """The teacher's view (OpsdConfig.teacher_from)."""
        return trainer.teacher() if self.cfg.teacher_from == "parent" else trainer.below()

    # -- preparation -------------------------------------------------------------------------
    def prepare(self, trainer: Trainer) -> None:
        lm, tok = trainer.lm, trainer.lm.tokenizer
        self._tok, self._device = tok, lm.device
        self._eot = min(end_of_turn_ids(tok) - {None})
        system_len = _system_prefix_len(tok)
        facts = self._facts()  # the sessions' own, before any review lesson joins them
        self.self_written = self._self_written(trainer, facts)
        self._add_review_lessons(trainer, facts)
        with self._teacher(trainer):
            for index, lesson in enumerate(self.lessons):
                check_fits(lm, lesson, room=64 + max(self.cfg.max_new_tokens, self.cfg.teacher_tokens))
                context_ids = render_ids(tok, lesson.context, add_generation_prompt=False)
                self.prefixes.append(encode_prefix(lm, context_ids))
                self.tokens_teacher += len(context_ids)
                for prompt in lesson.prompts():
                    self.probes.append(self._probe(tok, index, lesson, context_ids, prompt, system_len))
        if not self.probes:
            raise ValueError("the lessons have no probes: nothing to learn from")
        for j, text in enumerate([*self.anchors, *self.self_written, *self._reading_anchors()]):
            index = j % len(self.lessons)
            probe = self._probe(tok, index, self.lessons[index], self.prefixes[index].ids,
                                PracticePrompt(text, "anchor"), system_len)
            probe.anchor = True
            self.probes.append(probe)
        if self.cfg.teacher_mix > 0 and self.cfg.on_policy_from > 0:
            self._teacher_targets(trainer)
        self._anchor_targets(trainer)

    def _probe(self, tok, index: int, lesson: Lesson, context_ids: list[int],
               prompt: PracticePrompt, system_len: int) -> _Probe:
        user = [{"role": "user", "content": prompt.text}]
        student_ids = render_ids(tok, user)
        full = render_ids(tok, [*lesson.context, *user])
        if full[: len(context_ids)] != context_ids:
            raise AssertionError("the session's context does not render as a prefix of the teacher prompt")
        # The trap: teacher and student must see the probe turn (and so the answer) with the
        # same chat template and the same token ids.
        if common_suffix(full, student_ids) < len(student_ids) - system_len:
            raise AssertionError("teacher and student render the probe turn differently")
        return _Probe(index, prompt, student_ids, full[len(context_ids):])

    def _self_written(self, trainer: Trainer, facts: set[str]) -> list[str]:
        """OpsdConfig.self_anchors prompts the base model writes (learn/self_anchors.py), none
        naming a fact of the sessions or resembling the fixed anchors or `avoid`."""
        if self.cfg.self_anchors <= 0:
            return []
        started = time.time()
        with trainer.base():
            texts, counts = self_written(trainer.lm, self.cfg.self_anchors, trainer.cfg.seed,
                                         avoid=[*self.avoid, *self.anchors], facts=facts,
                                         batch=2 * self.cfg.batch)
        self.counts["self_anchors"] = len(texts)
        self.counts["self_anchors_dropped"] = counts["written"] - len(texts)
        trainer.report("self-written anchors", "prompts", len(texts), self.cfg.self_anchors, started)
        return texts

    def _facts(self) -> set[str]:
        """The sessions' fact words (learn/practice.py `anchors`): what ordinary prompts must
        not name."""
        facts: set[str] = set()
        for lesson in self.lessons:
            facts |= anchors(material(lesson.context))
        return facts

    def _add_review_lessons(self, trainer: Trainer, facts: set[str]) -> None:
        """OpsdConfig.review_prompts: a review lesson (learn/lesson.py `review_lesson`) for each
        lesson whose review has words, all on one set of prompts the base model writes, none
        of them an anchor or resembling `avoid`."""
        reviewed = [x for x in self.lessons if x.review.strip()]
        if self.cfg.review_prompts <= 0 or not reviewed:
            return
        started = time.time()
        with trainer.base():
            texts, _ = self_written(trainer.lm, self.cfg.review_prompts, trainer.cfg.seed + 1_000,
                                    avoid=[*self.avoid, *self.anchors, *self.self_written],
                                    facts=facts, batch=2 * self.cfg.batch)
        self.review_written = texts
        self.counts["review_prompts"] = len(texts) * len(reviewed)
        trainer.report("review prompts", "prompts", len(texts), self.cfg.review_prompts, started)
        if texts:
            self.lessons += [review_lesson(trainer.lm.tokenizer, x, texts) for x in reviewed]

    def _reading_anchors(self) -> list[str]:
        """In-context reading of the sessions' own sentences: the passage is in the prompt,
        so the answer must not change (sft destroyed this ability in the benchmarks)."""
        out = []
        for lesson in self.lessons:
            rule = [p for p in lesson.prompts() if p.kind == "rule" and p.sentence]
            for p in rule[: self.cfg.reading_anchors]:
                out.append(f"{p.sentence}\n\nQuestion: {p.text}")
        return out

    def _teacher_targets(self, trainer: Trainer) -> None:
        cfg, lm, tok = self.cfg, trainer.lm, trainer.lm.tokenizer
        lesson_probes = [i for i, p in enumerate(self.probes) if not p.anchor]
        answers: dict[int, list[list[int]]] = {i: [] for i in lesson_probes}
        started = time.time()
        keys: dict[int, set[str]] = {}

        def material_anchors(lesson: int) -> set[str]:
            if lesson not in keys:
                keys[lesson] = anchors(material(self.lessons[lesson].context))
            return keys[lesson]

        with self._teacher(trainer):
            runs = [(0.0, None)] + [(cfg.teacher_temperature, trainer.cfg.seed * 7919 + k + 1)
                                    for k in range(cfg.teacher_samples)]
            done, batches, total = 0, 0, len(lesson_probes) * len(runs)
            for temperature, seed in runs:
                params = SamplingParams(max_tokens=cfg.teacher_tokens, temperature=temperature,
                                        seed=seed)
                for chunk in self._by_lesson(lesson_probes):
                    prompts = [self.prefixes[self.probes[i].lesson].ids + self.probes[i].teacher_suffix
                               for i in chunk]
                    for i, out in zip(chunk, generate(lm, prompts, params), strict=True):
                        self.tokens_teacher += len(out.prompt_ids) + len(out.token_ids)
                        answers[i].append(self._with_eot(out))
                    done, batches = done + len(chunk), batches + 1
                    if batches % 4 == 0 or done == total:
                        trainer.report("teacher answers", "answers", done, total, started)
            for i in lesson_probes:
                prompt = self.probes[i].prompt
                self.counts["teacher_answers"] += len(answers[i])
                kept = [a for a in answers[i] if a]
                # open prompts: only answers that tell a fact of the session (informative_only)
                facts = (material_anchors(self.probes[i].lesson)
                         if cfg.informative_only and not prompt.answer and prompt.kind != "review"
                         else None)
                if facts is not None:
                    told = [a for a in kept
                            if informative(tok.decode(a, skip_special_tokens=True), prompt.text, facts)]
                    self.counts["uninformative"] += len(kept) - len(told)
                    kept = told
                if prompt.answer:
                    hit = [a for a in kept if contains(tok.decode(a, skip_special_tokens=True),
                                                       prompt.answer)]
                    self.counts["missed_span"] += len(kept) - len(hit)
                    kept = hit
                    if not kept and cfg.span_fallback:
                        kept = [tok.encode(prompt.answer, add_special_tokens=False) + [self._eot]]
                        self.counts["span_fallback"] += 1
                stored = None
                if prompt.given and facts is not None and not informative(prompt.given, prompt.text,
                                                                           facts):
                    self.counts["uninformative"] += 1
                elif prompt.given:
                    self.counts["given"] += 1
                    stored = self._stored_target(self.lessons[self.probes[i].lesson], prompt)
                    if stored is None:
                        self.counts["given_scored"] += 1
                        kept.append(tok.encode(prompt.given, add_special_tokens=False) + [self._eot])
                unique = list({tuple(a): a for a in kept}.values())
                if stored is not None:  # its row comes from the store; none is scored twice
                    unique = [a for a in unique if a != stored.response]
                    self.targets.setdefault(i, []).append(stored)
                    self.counts["reused"] += 1
                    self.counts["teacher_tokens_saved"] += (len(self.probes[i].teacher_suffix)
                                                            + len(stored.response))
                self.counts["kept"] += len(unique) + (stored is not None)
                self.counts["scored"] += len(unique)
                answers[i] = unique
            before = self.tokens_teacher
            self._score(trainer, answers, with_session=True)
            self.counts["teacher_tokens_scored"] += self.tokens_teacher - before

    def _stored_target(self, lesson: Lesson, prompt: PracticePrompt) -> _Target | None:
        """The teacher's row for the session's own answer to `prompt`, from the log-probs the
        server kept when it answered (see the module docstring for how its context differs);
        None where they are missing or are not what scoring would give."""
        data = lesson.kept.get(prompt.given_at) if self.cfg.reuse_kept else None
        if data is None:
            return None
        k = self.cfg.top_k or 32
        try:
            kept = decode_kept(data)
        except ValueError:
            return None
        if not kept.ended or kept.k < k or not kept.token_ids:
            return None
        if self._tok.decode(kept.token_ids, skip_special_tokens=True) != prompt.given:
            return None  # e.g. text cut by a stop string: the tokens say more than the answer
        return _Target(list(kept.token_ids) + [self._eot],
                       torch.tensor([row[:k] for row in kept.top_ids], dtype=torch.long,
                                    device=self._device),
                       torch.tensor([row[:k] for row in kept.top_logprobs], dtype=torch.float32,
                                    device=self._device))

    def _by_lesson(self, probes: Sequence[int]) -> list[list[int]]:
        """Batches of at most `batch` probes, each of one lesson: a batch then shares its
        session's context, which the decoder encodes once (model/generate.py)."""
        out: list[list[int]] = []
        for lesson in dict.fromkeys(self.probes[i].lesson for i in probes):
            mine = [i for i in probes if self.probes[i].lesson == lesson]
            out += [mine[k:k + self.cfg.batch] for k in range(0, len(mine), self.cfg.batch)]
        return out

    def _anchor_targets(self, trainer: Trainer) -> None:
        cfg, lm = self.cfg, trainer.lm
        anchors = [i for i, p in enumerate(self.probes) if p.anchor]
        if not anchors:
            return
        view = trainer.base if cfg.anchor_target == "base" else trainer.teacher
        with_session = cfg.anchor_target == "teacher"
        answers: dict[int, list[list[int]]] = {}
        with view():
            params = SamplingParams(max_tokens=cfg.teacher_tokens)
            for start in range(0, len(anchors), cfg.batch):
                chunk = anchors[start:start + cfg.batch]
                prompts = [self._scoring_prompt(i, with_session, full=True) for i in chunk]
                for i, out in zip(chunk, generate(lm, prompts, params), strict=True):
                    answers[i] = [self._with_eot(out)] if out.token_ids else []
            self._score(trainer, answers, with_session=with_session)

    def _scoring_prompt(self, i: int, with_session: bool, full: bool = False) -> list[int]:
        probe = self.probes[i]
        if not with_session:
            return probe.student_ids
        return (self.prefixes[probe.lesson].ids if full else []) + probe.teacher_suffix

    def _score(self, trainer: Trainer, answers: dict[int, list[list[int]]],
               with_session: bool) -> None:
        """Teacher-force every answer once and keep the top-k log-probs per token (run inside
        the view that scores: the teacher's, the base's or the prior's)."""
        k = self.cfg.top_k or 32
        rows = [(i, a) for i, group in answers.items() for a in group]
        by_lesson: dict[int, list[tuple[int, list[int]]]] = {}
        for i, a in rows:
            by_lesson.setdefault(self.probes[i].lesson if with_session else -1, []).append((i, a))
        for lesson, items in by_lesson.items():
            for start in range(0, len(items), self.cfg.batch):
                chunk = items[start:start + self.cfg.batch]
                prompts = [self._scoring_prompt(i, with_session) for i, _ in chunk]
                logits = response_logits(trainer.lm, prompts, [a for _, a in chunk],
                                         prefix=self.prefixes[lesson] if lesson >= 0 else None)
                logprobs = torch.log_softmax(logits.float(), -1)
                top = logprobs.topk(k, dim=-1)
                offset = 0
                for (i, a), p in zip(chunk, prompts, strict=True):
                    n = len(a)
                    self.targets.setdefault(i, []).append(
                        _Target(a, top.indices[offset:offset + n].clone(),
                                top.values[offset:offset + n].clone()))
                    offset += n
                    self.tokens_teacher += len(p) + n

    def _with_eot(self, completion) -> list[int]:
        ids = list(completion.token_ids)
        return ids + [self._eot] if completion.finish_reason == "stop" else ids

    # -- one step ----------------------------------------------------------------------------
    def _next(self, anchor: bool, rng) -> int:
        queue = self.queues[anchor]
        if not queue:
            # Anchors and teacher-only runs visit the probes that have a stored target.
            stored_only = anchor or (self.cfg.teacher_mix == 1.0 and self.cfg.on_policy_from == 1.0)
            queue.extend(i for i, p in enumerate(self.probes) if p.anchor == anchor
                         and (not stored_only or i in self.targets))
            if not queue:
                raise ValueError("no probe has a teacher answer to train on")
            rng.shuffle(queue)
        return queue.pop()

    def step(self, trainer: Trainer, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, rng, lm = self.cfg, trainer.rng, trainer.lm
        has_anchors = any(p.anchor and i in self.targets for i, p in enumerate(self.probes))
        n_anchor = round(cfg.prompts_per_step * cfg.anchor_share) if has_anchors else 0
        chosen = [(self._next(False, rng), False) for _ in range(cfg.prompts_per_step - n_anchor)]
        chosen += [(self._next(True, rng), True) for _ in range(n_anchor)]
        late = step >= cfg.on_policy_from * trainer.cfg.steps
        stored, live = [], []  # (probe, target) rows; probes whose rows the student samples
        for i, anchor in chosen:
            teacher_row = anchor or (not late and i in self.targets and rng.random() < cfg.teacher_mix)
            if teacher_row:
                stored.append((i, rng.choice(self.targets[i])))
            else:
                live.extend([i] * cfg.samples_per_prompt)

        sampled = self._sample(trainer, live, step) if live else []
        losses, n_tokens = [], 0
        if stored:
            prompts = [self.probes[i].student_ids for i, _ in stored]
            responses = [t.response for _, t in stored]
            logits = response_logits(lm, prompts, responses)
            per_tok = per_token_top(logits, torch.cat([t.top_ids for _, t in stored]),
                                    torch.cat([t.top_logprobs for _, t in stored]),
                                    cfg.divergence, cfg.beta)
            if cfg.label_weight:
                per_tok = per_tok + cfg.label_weight * _label_loss(
                    logits, responses, [not self.probes[i].anchor for i, _ in stored])
            losses += _row_means(per_tok, [len(r) for r in responses], [p.anchor for p in
                                                                        (self.probes[i] for i, _ in stored)])
            n_tokens += sum(len(r) for r in responses)
            self.tokens_student += sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        if sampled:
            rows, responses = zip(*sampled, strict=True)
            teacher = self._live_teacher(trainer, list(rows), list(responses))
            student = response_logits(lm, [self.probes[i].student_ids for i in rows], responses)
            per_tok = per_token(student, teacher, cfg.divergence, cfg.beta, cfg.top_k)
            losses += _row_means(per_tok, [len(r) for r in responses], [False] * len(rows))
            n_tokens += sum(len(r) for r in responses)
            self.tokens_student += sum(len(self.probes[i].student_ids) + len(r)
                                       for i, r in sampled)
        lesson = [loss for loss, anchor in losses if not anchor]
        anchor = [loss for loss, anchor in losses if anchor]
        total = torch.stack(lesson).mean() if lesson else torch.zeros((), device=lm.device)
        if anchor:
            total = total + cfg.anchor_weight * torch.stack(anchor).mean()
        return total, {
            "lesson_loss": float(torch.stack(lesson).detach().mean()) if lesson else 0.0,
            "anchor_loss": float(torch.stack(anchor).detach().mean()) if anchor else 0.0,
            "resp_len": n_tokens / max(len(losses), 1),
            "on_policy_rows": len(sampled) / max(len(sampled) + len(stored), 1),
        }

    def _sample(self, trainer: Trainer, rows: list[int], step: int) -> list[tuple[int, list[int]]]:
        params = SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                seed=trainer.cfg.seed * 100003 + step)
        with trainer.frozen_student():
            outs = generate(trainer.lm, [self.probes[i].student_ids for i in rows], params)
        return [(i, r) for i, r in zip(rows, (self._with_eot(o) for o in outs), strict=True) if r]

    def _live_teacher(self, trainer: Trainer, rows: list[int],
                      responses: list[list[int]]) -> torch.Tensor:
        """The teacher's logits on the student's own samples: one pass per session, each
        reusing that session's cached prefix; back in row order."""
        by_lesson: dict[int, list[int]] = {}
        for k, i in enumerate(rows):
            by_lesson.setdefault(self.probes[i].lesson, []).append(k)
        parts: dict[int, torch.Tensor] = {}
        with self._teacher(trainer):
            for lesson, ks in by_lesson.items():
                prompts = [self.probes[rows[k]].teacher_suffix for k in ks]
                logits = response_logits(trainer.lm, prompts, [responses[k] for k in ks],
                                         prefix=self.prefixes[lesson])
                self.tokens_teacher += sum(len(p) + len(responses[k]) for p, k in zip(prompts, ks, strict=True))
                offset = 0
                for k in ks:
                    parts[k] = logits[offset: offset + len(responses[k])]
                    offset += len(responses[k])
        return torch.cat([parts[k] for k in range(len(rows))])


def _label_loss(logits: torch.Tensor, responses: Sequence[Sequence[int]],
                lesson: Sequence[bool]) -> torch.Tensor:
    """Per response token: the student's cross-entropy on the token itself on lesson rows, 0 on
    anchor rows (they stay held by the divergence alone)."""
    targets = torch.tensor([t for r in responses for t in r], device=logits.device)
    mask = torch.tensor([on for r, on in zip(responses, lesson, strict=True) for _ in r],
                        device=logits.device, dtype=torch.float32)
    return F.cross_entropy(logits.float(), targets, reduction="none") * mask


def _row_means(per_tok: torch.Tensor, lengths: Sequence[int],
               anchors: Sequence[bool]) -> list[tuple[torch.Tensor, bool]]:
    """Each row's mean loss over its answer tokens, with whether the row is an anchor."""
    out, offset = [], 0
    for n, anchor in zip(lengths, anchors, strict=True):
        out.append((per_tok[offset:offset + n].mean(), anchor))
        offset += n
    return out


def _system_prefix_len(tok) -> int:
    """Tokens the template puts before the first user turn (a default system prompt)."""
    a = render_ids(tok, [{"role": "user", "content": "a"}])
    b = render_ids(tok, [{"role": "user", "content": "b"}])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
