"""Probes: student prompts the model writes from a session, with structure a small model can
follow (DESIGN.md: a 135M model is a poor free-form question writer).

Three kinds, each built per sentence of the material the session revealed:
  - `question`: a few-shot completion "Sentence: ... / Question: ..." (the model writes one
    question per sentence, copying the examples' form);
  - `cloze`: "Complete this sentence about TITLE: <first half>", built from the text itself;
  - `topic`: "What do you know about TITLE?" and "Tell me about TITLE.".
Quality is measured, not assumed (`probe_quality`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from onthejob.learn.evaluate import normalize
from onthejob.model import LoadedModel, SamplingParams, generate

_FEW_SHOT = (
    "Sentence: The Eiffel Tower was completed in 1889 for the World's Fair in Paris.\n"
    "Question: When was the Eiffel Tower completed?\n\n"
    "Sentence: Marie Curie won the Nobel Prize in Chemistry in 1911 for discovering radium.\n"
    "Question: What did Marie Curie discover?\n\n"
    "Sentence: The Amazon River flows through Brazil, Peru and Colombia.\n"
    "Question: Which countries does the Amazon River flow through?\n\n"
)


def sentences(text: str, min_words: int = 5) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])", text.strip())
    return [p.strip() for p in parts if len(p.split()) >= min_words]


def cloze_probes(text: str, title: str) -> list[str]:
    out = []
    for s in sentences(text):
        words = s.split()
        cut = max(3, len(words) // 2)
        out.append(f"Complete this sentence about {title}: {' '.join(words[:cut])} ...")
    return out


def topic_probes(title: str) -> list[str]:
    return [f"What do you know about {title}?", f"Tell me about {title}."] if title else []


def question_probes(lm: LoadedModel, text: str, max_new_tokens: int = 32) -> list[str]:
    """One model-written question per sentence (greedy, few-shot, one batch)."""
    tok = lm.tokenizer
    items = sentences(text)
    prompts = [tok.encode(f"{_FEW_SHOT}Sentence: {s}\nQuestion:", add_special_tokens=False)
               for s in items]
    questions = []
    for start in range(0, len(prompts), 8):
        outs = generate(lm, prompts[start: start + 8],
                        SamplingParams(max_tokens=max_new_tokens, stop=["\n"]))
        questions += [o.text.strip() for o in outs]
    return [q for q in questions if q.endswith("?") and len(q.split()) >= 3]


@dataclass
class ProbeQuality:
    count: int
    distinct: float  # share of distinct probes
    grounded: float  # share sharing at least two content words with the material
    questions: float  # share ending in "?"


def probe_quality(probes: Sequence[str], material: str) -> ProbeQuality:
    words = {w for w in normalize(material).split() if len(w) > 3}
    grounded = sum(len({w for w in normalize(p).split() if len(w) > 3} & words) >= 2 for p in probes)
    n = max(len(probes), 1)
    return ProbeQuality(len(probes), len(set(probes)) / n, grounded / n,
                        sum(p.strip().endswith("?") for p in probes) / n)


def make_probes(lm: LoadedModel, material: str, title: str = "",
                kinds: Sequence[str] = ("question", "cloze", "topic")) -> list[str]:
    """Probes of the requested kinds for `material` (the text a session revealed)."""
    out: list[str] = []
    if "question" in kinds:
        out += question_probes(lm, material)
    if "cloze" in kinds and title:
        out += cloze_probes(material, title)
    if "topic" in kinds:
        out += topic_probes(title)
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique
