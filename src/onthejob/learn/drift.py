"""How far the student has moved on ordinary prompts: KL(student || base) on the base's own
greedy answers to anchor prompts. Forgetting is predicted by this drift (DESIGN.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from onthejob.learn.divergence import per_token
from onthejob.learn.scoring import response_logits
from onthejob.model import SamplingParams, generate, render_ids

DEFAULT_ANCHORS = (
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "What is 7 times 8?",
    "Give me a synonym for happy.",
    "How many days are in a week?",
    "Name a fruit that is yellow.",
    "What do bees make?",
    "Translate 'thank you' into Spanish.",
    "What color is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet cat.",
)

# Ordinary prompts mixed into OPSD training; disjoint from DEFAULT_ANCHORS, which measure drift.
TRAINING_ANCHORS = (
    "What is the largest planet in our solar system?",
    "Write a short greeting for a friend.",
    "What is 12 plus 15?",
    "Name three colors.",
    "What is the opposite of cold?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "Give one tip for sleeping well.",
)


class AnchorDrift:
    def __init__(self, anchors: Sequence[str] = DEFAULT_ANCHORS, max_new_tokens: int = 24):
        self.anchors, self.max_new_tokens = list(anchors), max_new_tokens
        self.prompts: list[list[int]] = []
        self.responses: list[list[int]] = []
        self.base_logits: torch.Tensor | None = None

    def prepare(self, trainer) -> None:
        tok = trainer.lm.tokenizer
        self.prompts = [render_ids(tok, [{"role": "user", "content": a}]) for a in self.anchors]
        with trainer.base():
            outs = generate(trainer.lm, self.prompts, SamplingParams(max_tokens=self.max_new_tokens))
            self.responses = [o.token_ids or [tok.eos_token_id] for o in outs]
            self.base_logits = response_logits(trainer.lm, self.prompts, self.responses)

    def __call__(self, trainer) -> float:
        if self.base_logits is None:
            self.prepare(trainer)
        with trainer.frozen_student():
            logits = response_logits(trainer.lm, self.prompts, self.responses)
        return float(per_token(logits, self.base_logits, "reverse_kl").mean())
