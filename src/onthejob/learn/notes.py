"""The notes baseline (SEAL-like): the model, with the session in its context, writes notes
(the facts and their implications) several times; the student trains on those notes as text."""

from __future__ import annotations

import time
from collections.abc import Sequence

from onthejob.learn.lesson import Lesson
from onthejob.learn.loop import Trainer
from onthejob.learn.sft import TextLoss
from onthejob.model import SamplingParams, generate, render_ids

NOTE_REQUEST = ("Write down the facts from our conversation as a list of short, self-contained "
                "sentences. Name every person, place, number and date.")


class Notes(TextLoss):
    name = "notes"

    def __init__(self, lessons: Sequence[Lesson], notes_per_session: int = 4,
                 max_new_tokens: int = 160, batch_size: int = 4):
        self.lessons = list(lessons)
        self.notes_per_session, self.max_new_tokens = notes_per_session, max_new_tokens
        self.batch_size = batch_size
        self.sequences: list[list[int]] = []
        self.notes: list[str] = []
        self.tokens_student = 0
        self.tokens_teacher = 0

    def prepare(self, trainer: Trainer) -> None:
        tok = trainer.lm.tokenizer
        request = [{"role": "user", "content": NOTE_REQUEST}]
        prompts = [render_ids(tok, [*lesson.context, *request]) for lesson in self.lessons
                   for _ in range(self.notes_per_session)]
        # The first note greedy, the others sampled, so they vary.
        params = [SamplingParams(max_tokens=self.max_new_tokens),
                  SamplingParams(max_tokens=self.max_new_tokens, temperature=0.8,
                                 seed=trainer.cfg.seed)]
        started = time.time()
        with trainer.teacher():
            outs = []
            for start in range(0, len(prompts), 8):
                if start and (start // 8) % 2 == 0:
                    trainer.report("notes written", "notes", start, len(prompts), started)
                chunk = prompts[start: start + 8]
                greedy_rows = [k for k in range(len(chunk))
                               if (start + k) % self.notes_per_session == 0]
                sampled_rows = [k for k in range(len(chunk)) if k not in greedy_rows]
                got = {}
                for rows, p in ((greedy_rows, params[0]), (sampled_rows, params[1])):
                    if rows:
                        for k, o in zip(rows, generate(trainer.lm, [chunk[k] for k in rows], p),
                                        strict=True):
                            got[k] = o
                outs += [got[k] for k in range(len(chunk))]
        for lesson_index, lesson in enumerate(self.lessons):
            for o in outs[lesson_index * self.notes_per_session:
                          (lesson_index + 1) * self.notes_per_session]:
                self.tokens_teacher += len(o.prompt_ids) + len(o.token_ids)
                text = o.text.strip()
                if not text:
                    continue
                if lesson.title:
                    text = f"{lesson.title}\n{text}"
                self.notes.append(text)
                self.sequences.append(tok.encode(text, add_special_tokens=False) + [tok.eos_token_id])
        if not self.sequences:
            raise ValueError("the model wrote no notes: nothing to train on")
