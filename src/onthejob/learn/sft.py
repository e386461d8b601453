"""Supervised fine-tuning baselines: next-token loss on text.

- `Sft` on the session transcript itself (the naive target: every token of the rendered chat,
  the user's words included, since that is where a shared document lives);
- the notes rule (notes.py) reuses `TextLoss` on notes the model wrote.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from onthejob.learn.lesson import Lesson
from onthejob.learn.loop import Trainer
from onthejob.learn.scoring import response_logits
from onthejob.model import render_ids


class TextLoss:
    """Mean next-token cross-entropy over a batch of token sequences, drawn at random."""

    name = "text"

    def __init__(self, sequences: Sequence[list[int]], batch_size: int = 4):
        self.sequences = [s for s in sequences if len(s) > 1]
        if not self.sequences:
            raise ValueError("nothing to train on: every sequence is empty")
        self.batch_size = batch_size
        self.tokens_student = 0

    def prepare(self, trainer: Trainer) -> None:
        pass

    def step(self, trainer: Trainer, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        # Distinct sequences when there are enough; a single session is repeated.
        k = min(self.batch_size, len(self.sequences))
        batch = trainer.rng.sample(self.sequences, k)
        prompts = [s[:1] for s in batch]
        targets = [s[1:] for s in batch]
        logits = response_logits(trainer.lm, prompts, targets)
        labels = torch.tensor([t for r in targets for t in r], device=logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        self.tokens_student += sum(len(s) for s in batch)
        return loss, {"nll": float(loss.detach())}


class Sft(TextLoss):
    name = "sft"

    def __init__(self, lessons: Sequence[Lesson], tokenizer, batch_size: int = 4):
        sequences = [render_ids(tokenizer, lesson.context, add_generation_prompt=False)
                     for lesson in lessons]
        super().__init__(sequences, batch_size)
