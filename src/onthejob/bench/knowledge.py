"""The knowledge-transfer benchmark (SQuAD passages as co-work sessions).

Protocol per article: a session in which the user shares the passage and the model
acknowledges it; the article's questions are asked without the passage (base), with the
session in context (the ceiling), and without it after consolidating the session with each
method from the same base. Transfer ratio = (after - base) / (in-context - base), pooled
over the articles' questions. Split fixed by ../shared/data/README.md.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from onthejob.learn.drift import TRAINING_ANCHORS, AnchorDrift
from onthejob.learn.evaluate import answer
from onthejob.learn.gate import reading_accuracy
from onthejob.learn.lesson import Lesson
from onthejob.learn.loop import TrainConfig, Trainer
from onthejob.learn.notes import Notes
from onthejob.learn.opsd import Opsd, OpsdConfig
from onthejob.learn.probes import make_probes, probe_quality
from onthejob.learn.sft import Sft
from onthejob.model import load_model

SPLITS = {"dev": (0, 200), "test": (200, 400)}


@dataclass
class KnowledgeConfig:
    data: str
    split: str = "dev"
    sessions: int = 4
    methods: Sequence[str] = ("opsd", "sft", "notes")
    steps: int = 20
    lr: float = 1e-3
    seed: int = 0
    max_questions: int = 15
    opsd: OpsdConfig = field(default_factory=OpsdConfig)
    model: str | None = None


def session_for(article: dict) -> list[dict]:
    return [
        {"role": "user", "content": f"Here is a passage about {article['title']}. "
                                    f"Please read it carefully.\n\n{article['context']}"},
        {"role": "assistant", "content": "I have read the passage carefully and will remember it."},
    ]


def load_articles(path: str, split: str, n: int) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}")
    data = json.loads(Path(path).read_text())
    lo, hi = SPLITS[split]
    return data[lo:min(hi, lo + n)]


def _rule(method: str, lesson: Lesson, lm, cfg: KnowledgeConfig):
    if method == "opsd":
        return Opsd([lesson], list(TRAINING_ANCHORS), cfg.opsd)
    if method == "sft":
        return Sft([lesson], lm.tokenizer)
    if method == "notes":
        return Notes([lesson])
    raise ValueError(f"unknown method {method!r}")


def run(cfg: KnowledgeConfig, log=print) -> dict:
    articles = load_articles(cfg.data, cfg.split, cfg.sessions)
    rows = []
    started = time.time()
    for i, article in enumerate(articles):
        qs = article["questions"][: cfg.max_questions]
        questions, golds = [q["question"] for q in qs], [q["answer"] for q in qs]
        context = session_for(article)
        lm = load_model(cfg.model)
        base = answer(lm, questions, golds)
        ceiling = answer(lm, questions, golds, context=context)
        probes = make_probes(lm, article["context"], article["title"])
        quality = probe_quality(probes, article["context"])
        row = {"article": article["title"], "questions": len(qs), "base": sum(base.correct),
               "in_context": sum(ceiling.correct), "base_f1": base.mean_f1,
               "in_context_f1": ceiling.mean_f1, "probes": len(probes),
               "probe_quality": asdict(quality), "methods": {}}
        log(f"[{i + 1}/{len(articles)}] {article['title']}: base {row['base']}/{len(qs)}, "
            f"in-context {row['in_context']}/{len(qs)}, {len(probes)} probes "
            f"({time.time() - started:.0f} s elapsed)")
        for method in cfg.methods:
            lm = load_model(cfg.model)
            lesson = Lesson(f"article-{i}", context, list(probes), title=article["title"])
            t0 = time.time()
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            trainer = Trainer(lm, TrainConfig(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed))
            rule = _rule(method, lesson, lm, cfg)
            history = trainer.run(rule, drift=AnchorDrift())
            train_s = time.time() - t0
            with trainer.frozen_student():
                after = answer(lm, questions, golds)
                reading = reading_accuracy(lm)
            row["methods"][method] = {
                "after": sum(after.correct), "after_f1": after.mean_f1,
                "seconds": train_s, "peak_rss_mb": max(rss0, resource.getrusage(
                    resource.RUSAGE_SELF).ru_maxrss) / 1024,
                "kl_to_base": history[-1].get("kl_to_base"), "reading_after": reading,
                "tokens_student": getattr(rule, "tokens_student", 0),
                "tokens_teacher": getattr(rule, "tokens_teacher", 0),
                "answers": after.answers}
            log(f"    {method}: after {sum(after.correct)}/{len(qs)} (F1 {after.mean_f1:.3f}), "
                f"KL to base {history[-1].get('kl_to_base', 0):.3f}, {train_s:.0f} s; "
                f"ETA {_eta(started, i, len(articles), cfg.methods, method):.0f} s")
        rows.append(row)
    with torch.no_grad():
        reading_base = reading_accuracy(load_model(cfg.model))
    return summarize(cfg, rows, reading_base, time.time() - started)


def _eta(started: float, i: int, n: int, methods: Sequence[str], method: str) -> float:
    done = i + (list(methods).index(method) + 1) / len(methods)
    return (time.time() - started) / done * (n - done)


def summarize(cfg: KnowledgeConfig, rows: list[dict], reading_base: float, seconds: float) -> dict:
    total = sum(r["questions"] for r in rows)
    base = sum(r["base"] for r in rows) / total
    ceiling = sum(r["in_context"] for r in rows) / total
    methods = {}
    for m in cfg.methods:
        after = sum(r["methods"][m]["after"] for r in rows) / total
        gap = ceiling - base
        methods[m] = {
            "after": after,
            "transfer_ratio": (after - base) / gap if gap > 0 else float("nan"),
            "seconds_per_session": sum(r["methods"][m]["seconds"] for r in rows) / len(rows),
            "peak_rss_mb": max(r["methods"][m]["peak_rss_mb"] for r in rows),
            "kl_to_base": sum(r["methods"][m]["kl_to_base"] or 0 for r in rows) / len(rows),
            "reading_drop_pts": 100 * (reading_base - sum(r["methods"][m]["reading_after"]
                                                          for r in rows) / len(rows)),
        }
    return {"config": {**asdict(cfg), "methods": list(cfg.methods)}, "questions": total,
            "base": base, "in_context": ceiling, "reading_base": reading_base,
            "methods": methods, "rows": rows, "seconds": seconds,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                       f"Python {sys.version.split()[0]}, torch {torch.__version__}",
            "date": date.today().isoformat()}


def markdown(result: dict, command: str) -> str:
    lines = [f"# Knowledge transfer ({result['config']['split']} split, "
             f"{len(result['rows'])} sessions, {result['questions']} questions)", "",
             f"Command: `{command}`  ", f"Date: {result['date']}; machine: {result['machine']}; "
             f"total {result['seconds'] / 60:.1f} min", "",
             f"Base (no context): {result['base']:.1%}; in context: {result['in_context']:.1%}; "
             f"in-context reading on unseen passages (base): {result['reading_base']:.1%}", "",
             "| method | no-context accuracy after | transfer ratio | s / session | peak RSS MB "
             "| KL to base | reading drop (pts) |", "|---|---|---|---|---|---|---|"]
    for m, v in result["methods"].items():
        lines.append(f"| {m} | {v['after']:.1%} | {v['transfer_ratio']:.3f} | "
                     f"{v['seconds_per_session']:.0f} | {v['peak_rss_mb']:.0f} | "
                     f"{v['kl_to_base']:.3f} | {v['reading_drop_pts']:+.1f} |")
    lines += ["", "Per session:", "", "| article | base | in context | probes | "
              + " | ".join(result["methods"]) + " |", "|---|---|---|---|"
              + "---|" * len(result["methods"])]
    for r in result["rows"]:
        lines.append(f"| {r['article']} | {r['base']}/{r['questions']} | "
                     f"{r['in_context']}/{r['questions']} | {r['probes']} | "
                     + " | ".join(f"{r['methods'][m]['after']}" for m in result["methods"]) + " |")
    return "\n".join(lines) + "\n"
