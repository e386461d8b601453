"""Anchor prompts the base model writes itself.

OPSD holds ordinary prompts to the base model's answers (anchors) so that a session's lessons
do not spill into everything else. The fixed anchors are 64 hand-written prompts
(learn/drift.py TRAINING_ANCHORS); an adapter can keep those still and drift everywhere
else. Here the base model writes as many more as asked, as a user would: the chat template
is rendered up to where a user's words begin and the model continues it (the user turn it
finds likely, after Magpie, Xu et al. 2024). Some turns are started with a question word,
so that short questions, the form of the lessons' practice prompts, are among them.

The same prompts carry a review's words as an instruction (OpsdConfig.review_prompts,
learn/lesson.py `review_lesson`): ordinary prompts on which the teacher reads only the review.

Nothing the model writes here may resemble what measures forgetting: a prompt is dropped when
it contains, or shares half its words with (token F1 >= 0.5), a general question
(data/general.json), a drift anchor (DEFAULT_ANCHORS) or any text the caller names; and when
it names a fact of the session (those must move, not be held still).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from onthejob.learn.drift import DEFAULT_ANCHORS
from onthejob.learn.evaluate import ANSWER_HINT, normalize
from onthejob.learn.gate import general_set
from onthejob.model import LoadedModel, SamplingParams, generate
from onthejob.model.chat import render_text

# How the model's user turns begin: "" lets it start anywhere (requests, tasks, chat); a
# question word makes a short question, which gets the lessons' ANSWER_HINT.
STARTERS = ("", "", "What", "Who", "Which", "How many", "When", "Where", "Why", "How")
MAX_TOKENS = 40  # a user turn that runs longer is dropped (it did not finish)
MIN_WORDS, MAX_WORDS = 3, 40
_MARK = "\u2063\u2063"  # invisible separators: where the user's words would go


def user_turn_ids(tokenizer) -> list[int]:
    """Token ids of the chat template up to where a user's words begin (with the template's
    default system prompt, as the student sees every prompt)."""
    text = render_text(tokenizer, [{"role": "user", "content": _MARK}], add_generation_prompt=False)
    if _MARK not in text:
        raise ValueError("the chat template does not show a user turn's words as given")
    return list(tokenizer.encode(text[: text.index(_MARK)], add_special_tokens=False))


def resembles(text: str, others: Iterable[str] | _Keys, threshold: float = 0.5) -> bool:
    """Whether `text` contains one of `others` (normalized) or shares at least `threshold`
    token F1 (learn/evaluate.py `f1`) with it."""
    keys = others if isinstance(others, _Keys) else _Keys(others)
    key = normalize(text)
    words = Counter(key.split())
    n = sum(words.values())
    for o, counts, m in keys.items:
        if o in key:
            return True
        common = sum((words & counts).values())
        if common and n and 2 * common / (n + m) >= threshold:  # F1 = 2c / (|p| + |g|)
            return True
    return False


class _Keys:
    """`others` normalized once, with their word counts (the filter asks hundreds of texts)."""

    def __init__(self, others: Iterable[str]):
        self.items = []
        for other in others:
            o = normalize(other)
            if o:
                self.items.append((o, Counter(o.split()), len(o.split())))


def forbidden_texts(extra: Iterable[str] = ()) -> list[str]:
    """What self-written anchors must not resemble: the general questions that measure
    forgetting, the drift anchors, and `extra` (a benchmark's evaluation prompts)."""
    return [*(it["question"] for it in general_set()), *DEFAULT_ANCHORS, *extra]


def self_written(lm: LoadedModel, n: int, seed: int = 0, *, avoid: Sequence[str] = (),
                 facts: Iterable[str] = (), batch: int = 32) -> tuple[list[str], dict[str, int]]:
    """Up to `n` distinct user prompts the model (as it is loaded: call it under the base
    view) writes itself, none resembling `forbidden_texts(avoid)` or naming one of `facts`
    (the session's fact words, learn/practice.py `anchors`); and the counts of what was written and
    dropped. Sampled at temperature 1 with `seed`; at most four rounds of `n` tries."""
    counts = dict.fromkeys(("written", "unfinished", "size", "duplicate", "resembles",
                            "names_fact"), 0)
    if n <= 0:
        return [], counts
    tok = lm.tokenizer
    head = user_turn_ids(tok)
    forbidden = _Keys(forbidden_texts(avoid))
    facts = {normalize(f) for f in facts} - {""}
    out: list[str] = []
    seen: set[str] = set()
    for round_ in range(4):
        if len(out) >= n:
            break
        starts = [STARTERS[(k + round_) % len(STARTERS)] for k in range(n)]
        for start in range(0, n, batch):
            chunk = starts[start:start + batch]
            prompts = [head + (list(tok.encode(s, add_special_tokens=False)) if s else []) for s in chunk]
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95,
                                    seed=seed * 1_000_003 + round_ * 10_007 + start)
            for s, done in zip(chunk, generate(lm, prompts, params), strict=True):
                counts["written"] += 1
                text = (s + done.text).strip() if s else done.text.strip()
                text = re.sub(r"\s+", " ", text)
                key = normalize(text)
                if done.finish_reason != "stop":
                    counts["unfinished"] += 1
                elif not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                    counts["size"] += 1
                elif key in seen:
                    counts["duplicate"] += 1
                elif resembles(text, forbidden):
                    counts["resembles"] += 1
                elif facts & set(key.split()):
                    counts["names_fact"] += 1
                else:
                    seen.add(key)
                    out.append(text + ANSWER_HINT if s and text.endswith("?") else text)
    return out[:n], counts
