"""Question answering with and without a session in context: normalized match and token F1
(SQuAD's normalization; no model judge)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from onthejob.model import LoadedModel, SamplingParams, generate, render_ids
from onthejob.model.chat import Message

ANSWER_HINT = " Answer in a few words."


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains(prediction: str, gold: str) -> bool:
    g = normalize(gold)
    return bool(g) and g in normalize(prediction)


def f1(prediction: str, gold: str) -> float:
    p, g = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


@dataclass
class QaResult:
    answers: list[str]
    correct: list[bool]  # the normalized answer contains the normalized gold (lenient)
    f1: list[float]  # token F1 against the gold (strict on length: a recited passage scores low)
    exact: list[bool] = field(default_factory=list)  # normalized answer == normalized gold

    @property
    def mean_exact(self) -> float:
        return sum(self.exact) / max(len(self.exact), 1)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(len(self.correct), 1)

    @property
    def mean_f1(self) -> float:
        return sum(self.f1) / max(len(self.f1), 1)


def answer(lm: LoadedModel, questions: Sequence[str], golds: Sequence[str],
           context: Sequence[Message] = (), max_new_tokens: int = 24, batch: int = 8) -> QaResult:
    """Greedy answers to `questions`, with `context` (a session's messages) before each."""
    tok = lm.tokenizer
    prompts = [render_ids(tok, [*context, {"role": "user", "content": q + ANSWER_HINT}])
               for q in questions]
    answers: list[str] = []
    for start in range(0, len(prompts), batch):
        outs = generate(lm, prompts[start: start + batch], SamplingParams(max_tokens=max_new_tokens))
        answers += [o.text for o in outs]
    correct = [contains(a, g) for a, g in zip(answers, golds, strict=True)]
    scores = [f1(a, g) for a, g in zip(answers, golds, strict=True)]
    exact = [bool(normalize(g)) and normalize(a) == normalize(g)
             for a, g in zip(answers, golds, strict=True)]
    return QaResult(answers, correct, scores, exact)
