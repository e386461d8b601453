"""The promotion gate: a candidate adapter becomes active only if it learned and did not forget.

- learned: on probes held back from training (a fact's question in a phrasing training never
  saw), the student's answer *without* the session is scored against the known answer span
  (or, where none is known, the teacher's answer *with* the session): 1 if it contains it,
  else token F1; the gain over the parent must reach `min_gain`;
- forgot: (a) KL to the base on anchor prompts at most `max_kl`; (b) in-context reading
  comprehension on passages never trained on (24 shipped with the package) drops at most
  `max_retention_drop`; (c) earlier sessions' held-back probes, recorded in the parent
  chain's metrics, lose at most `max_earlier_drop` of F1; (d) short general questions the
  base model answers right robustly (`gate_general_set`: 79 of the 86 shipped with the
  package, "What is the capital of Japan?") drop at most `max_general_drop`. (d) is what caught an sft candidate that answered "New
  York City" for Japan's capital while its KL was under the limit and reading did not move.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources

from onthejob.learn.evaluate import ANSWER_HINT, answer, contains, f1
from onthejob.model import LoadedModel, SamplingParams, generate, render_ids
from onthejob.model.chat import Message

# Bounds are inclusive, and a measure that is a difference of shares (1.0 - 0.95) lands a float
# rounding above or below the bound it equals: within SLACK of a bound counts as on it.
SLACK = 1e-9


@dataclass
class GateConfig:
    min_gain: float = 0.02
    max_kl: float = 0.5
    max_retention_drop: float = 0.15
    max_earlier_drop: float = 0.10
    max_general_drop: float = 0.05  # 4 of the 79 stable general questions


@dataclass
class Verdict:
    promote: bool
    reason: str
    metrics: dict


def retention_set() -> list[dict]:
    text = resources.files("onthejob").joinpath("data/retention.json").read_text()
    return json.loads(text)["items"]


def general_set() -> list[dict]:
    """Short general questions ({"question", "answers"}) the default base model answers right."""
    text = resources.files("onthejob").joinpath("data/general.json").read_text()
    return json.loads(text)["items"]


def gate_general_set(items: Sequence[dict] | None = None) -> list[dict]:
    """The general questions the promotion gate asks: those (of `items`, default all) the base
    model answers right robustly. The others flipped under random adapter noise a tenth the
    size of a trained candidate's (docs/results/general-sensitivity/): a drop on them is a coin
    landing, not forgetting, and the 7 of them would make 8 points of drop on their own."""
    return [it for it in (general_set() if items is None else items) if it.get("stable", True)]


def general_accuracy(lm: LoadedModel, items: Sequence[dict] | None = None) -> float:
    """Share of the general questions answered right without context (any accepted answer)."""
    items = list(items or general_set())
    result = answer(lm, [it["question"] for it in items], [it["answers"][0] for it in items])
    right = [any(contains(a, g) for g in it["answers"])
             for a, it in zip(result.answers, items, strict=True)]
    return sum(right) / max(len(right), 1)


def reading_accuracy(lm: LoadedModel, items: Sequence[dict] | None = None) -> float:
    """In-context reading comprehension: the passage and its question in one user turn."""
    items = list(items or retention_set())
    questions = [f"{it['context']}\n\nQuestion: {it['question']}" for it in items]
    return answer(lm, questions, [it["answer"] for it in items]).accuracy


def references(lm: LoadedModel, probes: Sequence[tuple[Sequence[Message], str]],
               max_new_tokens: int = 24) -> list[str]:
    """The teacher's greedy answers to probes, each with its session in context."""
    prompts = [render_ids(lm.tokenizer, [*ctx, {"role": "user", "content": q + ANSWER_HINT}])
               for ctx, q in probes]
    out: list[str] = []
    for start in range(0, len(prompts), 8):
        out += [o.text for o in generate(lm, prompts[start:start + 8],
                                         SamplingParams(max_tokens=max_new_tokens))]
    return out


def probe_f1(lm: LoadedModel, questions: Sequence[str], refs: Sequence[str]) -> float:
    """Mean score of answers without context against the references (a known answer span, or
    the teacher's answer): 1 where the answer contains the reference, else token F1."""
    if not questions:
        return 0.0
    result = answer(lm, questions, refs)
    return sum(1.0 if contains(a, r) else f1(a, r)
               for a, r in zip(result.answers, refs, strict=True)) / len(refs)


def decide(cfg: GateConfig, *, gain: float, kl: float | None, retention_drop: float,
           earlier_drop: float, general_drop: float = 0.0, extra: dict | None = None) -> Verdict:
    """Promote only if every check passes; the reason names each check that failed. A bound
    is inclusive (a gain of exactly `min_gain`, a KL of exactly `max_kl` pass). A measure
    that is not a finite number fails its check: a NaN compares false with every bound and
    would otherwise pass. A KL that was never measured (None) is an error, not a zero."""
    if kl is None:
        raise ValueError("the gate needs the KL to the base, and the training run did not "
                         "measure it (no 'kl_to_base' in its last step): train with an anchor "
                         "drift measure (AnchorDrift) so that forgetting can be checked")
    metrics = {"gain": gain, "kl_to_base": kl, "retention_drop": retention_drop,
               "earlier_drop": earlier_drop, "general_drop": general_drop,
               "thresholds": asdict(cfg), **(extra or {})}
    problems = [f"{name} is {value!r}, not a finite number" for name, value in
                (("held-back probe F1 gain", gain), ("KL to base", kl),
                 ("retention drop", retention_drop), ("earlier-probe drop", earlier_drop),
                 ("general-question drop", general_drop))
                if not math.isfinite(value)]
    if gain < cfg.min_gain - SLACK:
        problems.append(f"did not learn: held-back probe F1 gain {gain:+.3f} < {cfg.min_gain}")
    if kl > cfg.max_kl + SLACK:
        problems.append(f"moved too far: KL to base {kl:.3f} > {cfg.max_kl}")
    if retention_drop > cfg.max_retention_drop + SLACK:
        problems.append(f"forgot reading: retention dropped {retention_drop:.3f} > "
                        f"{cfg.max_retention_drop}")
    if earlier_drop > cfg.max_earlier_drop + SLACK:
        problems.append(f"forgot earlier sessions: probe F1 dropped {earlier_drop:.3f} > "
                        f"{cfg.max_earlier_drop}")
    if general_drop > cfg.max_general_drop + SLACK:
        problems.append(f"forgot general knowledge: general-question accuracy dropped "
                        f"{general_drop:.3f} > {cfg.max_general_drop}")
    if problems:
        return Verdict(False, "; ".join(problems), metrics)
    return Verdict(True, f"learned (gain {gain:+.3f}) and did not forget "
                         f"(KL {kl:.3f}, retention drop {retention_drop:+.3f}, "
                         f"general drop {general_drop:+.3f})", metrics)
