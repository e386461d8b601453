"""How far the student has moved on ordinary prompts: KL(student || base) on the base's own
greedy answers to anchor prompts. Forgetting is predicted by this drift (DESIGN.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from onthejob.learn.divergence import per_token
from onthejob.learn.evaluate import ANSWER_HINT
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

# Ordinary prompts mixed into OPSD training, held to the base's own answers; disjoint from
# DEFAULT_ANCHORS (which measure drift) and from data/general.json (which measures forgetting;
# tests/test_drift.py asserts both). Most are short questions in the very form the lessons'
# practice prompts take (ANSWER_HINT): the lessons teach "a short question about the session
# -> its fact", and without short questions about other things held still, the adapter also
# learns "any short question -> the session's facts" (the ablation's 16.7-point general drop).
PLAIN_ANCHORS = (
    "What is the largest planet in our solar system?",
    "Write a short greeting for a friend.",
    "What is 12 plus 15?",
    "Name three colors.",
    "What is the opposite of cold?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "Give one tip for sleeping well.",
    "Write a haiku about autumn.",
    "List two ways to save water.",
    "Explain what a noun is in one sentence.",
    "Write a polite way to decline an invitation.",
    "Say in one sentence what a library is for.",
    "Give an example of a verb.",
)
SHORT_ANCHORS = (
    "What animal is known as the king of the jungle?",
    "How many wheels does a bicycle have?",
    "What is 9 minus 4?",
    "What is 6 times 7?",
    "What is half of 20?",
    "How many minutes are in an hour?",
    "How many hours are in a day?",
    "How many continents are there?",
    "What is the tallest animal?",
    "Which planet is known as the Red Planet?",
    "What do caterpillars turn into?",
    "What is the plural of mouse?",
    "What is the past tense of run?",
    "What shape has four equal sides?",
    "What instrument has 88 keys?",
    "Who was the first president of the United States?",
    "What is the fastest land animal?",
    "Which season comes after winter?",
    "What is the first letter of the English alphabet?",
    "What is the main ingredient of bread?",
    "Which bird is a symbol of peace?",
    "What is the largest continent?",
    "In which direction does the sun rise?",
    "What is the square root of 81?",
    "What is 100 divided by 4?",
    "What is the study of living things called?",
    "What is the hardest natural substance?",
    "What part of a plant makes food from sunlight?",
    "What is the name of our galaxy?",
    "What is the largest bone in the human body?",
    "How many strings does a standard guitar have?",
    "Which animal has a trunk?",
    "What is a group of wolves called?",
    "Which ocean lies between Europe and North America?",
    "What tool do you use to cut paper?",
    "What is 15 plus 10?",
    "What do you call a doctor who treats teeth?",
    "What do you call the person who flies an airplane?",
    "What is the main gas in the air we breathe?",
    "Where do most penguins live?",
    "What kind of animal is a frog?",
    "What is the smallest prime number?",
    "Which month has the fewest days?",
    "What does a thermometer measure?",
    "Which direction does a compass needle point?",
    "What force pulls objects toward the ground?",
    "Who wrote the play Hamlet?",
    "What is the largest country by area?",
    "What is the color of an emerald?",
    "How many players are on a basketball team on the court?",
)
TRAINING_ANCHORS = (*PLAIN_ANCHORS, *(q + ANSWER_HINT for q in SHORT_ANCHORS))


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
