"""The dreaming benchmark: four ways to spend compute on a session, on the knowledge
benchmark's sessions (SQuAD passages; data loading and sessions from bench/knowledge.py).

- compact: the model summarizes the session (the server's /compact instruction); the
  questions are asked with only the summary in context (the store's context rule). No
  weights change; the compute is the summary's generation.
- opsd: OPSD with the session as teacher on consolidation's probes (make_probes).
- dream: the model with the session writes tasks (dream/tasks.py), the environment gate
  keeps those that pass (dream/validity.py), OPSD trains on the dreamed questions.
- dream+opsd: OPSD on the probes and the dreamed questions together.
- dream-grpo: GRPO (learn/grpo.py) on a DreamEnv of the dreamed tasks that passed the gate:
  the student's sampled answers rewarded by the tasks' checkers (`onthejob dream --mode grpo`).
- dream-both: OPSD and GRPO on alternate steps (`onthejob dream --mode both`).
The three dream methods share one writing and gating per session (its compute is charged to
each). `tasks_only` writes and gates the dreams without training: parse and gate pass rates
per article, by who wrote the task (the model, or a rule: the rule or cloze fallback).
Each training method is evaluated without context at every budget in `budgets` (steps of
one run, evaluation time excluded): pooled no-context accuracy, transfer ratio =
(after - base) / (in context - base), KL to base on anchor prompts, in-context reading
accuracy on unseen passages (forgetting), seconds and tokens spent (writing and gating
the dreams included).
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date

import torch

from onthejob.bench.knowledge import SPLITS, load_articles, load_data, session_for
from onthejob.dream.run import Alternating, DreamOptions, dream_session, grpo_rule
from onthejob.dream.tasks import RULE_SOURCES
from onthejob.dream.validity import DreamGateConfig
from onthejob.learn.consolidate import recommended_opsd
from onthejob.learn.drift import TRAINING_ANCHORS, AnchorDrift
from onthejob.learn.evaluate import answer
from onthejob.learn.gate import reading_accuracy
from onthejob.learn.lesson import Lesson
from onthejob.learn.loop import TrainConfig, Trainer
from onthejob.learn.opsd import Opsd, OpsdConfig
from onthejob.learn.probes import make_probes
from onthejob.model import SamplingParams, generate, load_model, render_ids
from onthejob.serve.turns import COMPACT_INSTRUCTION
from onthejob.store.context import SUMMARY_HEADER

METHODS = ("compact", "opsd", "dream", "dream+opsd", "dream-grpo", "dream-both")
DEFAULT_METHODS = ("compact", "opsd", "dream", "dream+opsd")


@dataclass
class DreamBenchConfig:
    data: str
    split: str = "test"
    sessions: int = 2
    methods: Sequence[str] = DEFAULT_METHODS
    budgets: Sequence[int] = (5, 15)
    lr: float = 3e-3
    seed: int = 0
    group: int = 6
    max_questions: int = 15
    model: str | None = None
    opsd: OpsdConfig = field(default_factory=recommended_opsd)  # consolidation's recipe
    articles: Sequence[int] | None = None  # indices within the split (instead of the first n)
    style: str = "span"  # the dream writer (dream/tasks.py)
    attempts: int = 3
    fallback: str = "rule"
    grpo_starts: int = 2  # dream-grpo / dream-both: tasks per GRPO step

    def dream_options(self) -> DreamOptions:
        return DreamOptions(style=self.style, attempts=self.attempts, fallback=self.fallback,
                            grpo_starts=self.grpo_starts,
                            env_gate=DreamGateConfig(group=self.group, seed=self.seed))


def select_articles(cfg: DreamBenchConfig) -> list[dict]:
    if cfg.articles is None:
        return load_articles(cfg.data, cfg.split, cfg.sessions)
    data = load_data(cfg.data)
    lo, hi = SPLITS[cfg.split]
    bad = [k for k in cfg.articles if not 0 <= k < hi - lo or lo + k >= len(data)]
    if bad:
        raise ValueError(f"articles {bad} are not in the {cfg.split} split (0-{hi - lo - 1} "
                         f"within it)")
    return [data[lo + k] for k in cfg.articles]


def _compact(lm, context, questions, golds) -> dict:
    started = time.time()
    prompt = render_ids(lm.tokenizer, [*context, {"role": "user", "content": COMPACT_INSTRUCTION}])
    summary = generate(lm, [prompt], SamplingParams(max_tokens=256))[0]
    seconds = time.time() - started
    after = answer(lm, questions, golds,
                   context=[{"role": "system", "content": SUMMARY_HEADER + summary.text.strip()}])
    return {"points": [{"budget": 0, "after": sum(after.correct), "after_f1": after.mean_f1,
                        "seconds": seconds, "tokens": len(prompt) + len(summary.token_ids),
                        "kl_to_base": 0.0, "reading": None}],
            "summary": summary.text.strip(), "answers": after.answers}


def _tokens(rule) -> int:
    """Tokens a rule has spent: OPSD's student and teacher tokens; GRPO's sampled rollouts."""
    return rule.tokens_student + rule.tokens_teacher


def make_rule(method: str, lesson: Lesson, tasks, cfg: DreamBenchConfig, run_id: str,
              questions: Sequence[str] = ()):
    """The training rule of a bench method: OPSD on the lesson's prompts, or GRPO (alone or on
    alternate steps with OPSD) on a DreamEnv of the passed dreamed `tasks`. `questions`: the
    evaluation's, which no self-written anchor may resemble."""
    opsd = Opsd([lesson], list(TRAINING_ANCHORS), cfg.opsd, avoid=questions)
    if method in ("dream-grpo", "dream-both"):
        grpo = grpo_rule(tasks, cfg.dream_options(), run_id=run_id)
        if method == "dream-grpo":
            return grpo
        return Alternating(opsd, grpo)
    return opsd


def _train(lm, lesson: Lesson, cfg: DreamBenchConfig, questions, golds, overhead_s: float,
           overhead_tokens: int, log, rule=None) -> list[dict]:
    """One training run (OPSD unless `rule` is given) to max(budgets) steps, evaluated at each
    budget (evaluation untimed)."""
    trainer = Trainer(lm, TrainConfig(steps=max(cfg.budgets), lr=cfg.lr, seed=cfg.seed))
    rule = rule or Opsd([lesson], list(TRAINING_ANCHORS), cfg.opsd, avoid=questions)
    drift = AnchorDrift()
    drift.prepare(trainer)
    points: list[dict] = []
    clock = {"start": time.time(), "paused": 0.0}

    def at_step(m: dict) -> None:
        if m["step"] not in cfg.budgets:
            return
        paused = time.time()
        with trainer.frozen_student():
            after = answer(lm, questions, golds)
            reading = reading_accuracy(lm)
        kl = drift(trainer)
        spent = paused - clock["start"] - clock["paused"]
        points.append({"budget": m["step"], "after": sum(after.correct), "after_f1": after.mean_f1,
                       "seconds": overhead_s + spent,
                       "tokens": overhead_tokens + _tokens(rule),
                       "kl_to_base": kl, "reading": reading, "answers": after.answers})
        log(f"      step {m['step']}: {sum(after.correct)}/{len(questions)} right, KL {kl:.3f}, "
            f"reading {reading:.0%}, {overhead_s + spent:.0f} s spent")
        clock["paused"] += time.time() - paused

    trainer.run(rule, progress=at_step)
    return points


def run(cfg: DreamBenchConfig, log: Callable[[str], None] = print) -> dict:
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    articles = select_articles(cfg)
    started = time.time()
    rows = []
    lm = load_model(cfg.model)
    with torch.no_grad():
        reading_base = reading_accuracy(lm)
    for i, article in enumerate(articles):
        qs = article["questions"][: cfg.max_questions]
        questions, golds = [q["question"] for q in qs], [q["answer"] for q in qs]
        context = session_for(article)
        lm = load_model(cfg.model)
        base = answer(lm, questions, golds)
        ceiling = answer(lm, questions, golds, context=context)
        row = {"article": article["title"], "questions": len(qs), "base": sum(base.correct),
               "in_context": sum(ceiling.correct), "methods": {}}
        log(f"[{i + 1}/{len(articles)}] {article['title']}: base {row['base']}/{len(qs)}, "
            f"in context {row['in_context']}/{len(qs)} ({time.time() - started:.0f} s elapsed)")
        t0 = time.time()
        probes = make_probes(lm, article["context"], article["title"])
        probe_s = time.time() - t0
        dreamed, passed = None, []
        if any(m.startswith("dream") for m in cfg.methods):
            dreamed, passed = _dream_stats(lm, context, article["title"], cfg, log)
            row["dream"] = dreamed
        for method in cfg.methods:
            log(f"    {method}:")
            lm = load_model(cfg.model)
            if method == "compact":
                row["methods"][method] = _compact(lm, context, questions, golds)
                p = row["methods"][method]["points"][0]
                log(f"      summary in context: {p['after']}/{len(qs)} right, {p['seconds']:.0f} s")
                continue
            prompts, over_s, over_tok = list(probes), probe_s, 0
            if method.startswith("dream"):
                prompts = dreamed["questions"] + (list(probes) if method == "dream+opsd" else [])
                over_s += dreamed["seconds"] - (0 if method == "dream+opsd" else probe_s)
                over_tok += dreamed["tokens"]
            if not prompts:
                log("      nothing to train on (no dreamed task passed the gate)")
                row["methods"][method] = {"points": [
                    {"budget": b, "after": row["base"], "after_f1": base.mean_f1,
                     "seconds": over_s, "tokens": over_tok, "kl_to_base": 0.0,
                     "reading": reading_base, "untrained": True} for b in cfg.budgets]}
                continue
            lesson = Lesson(f"article-{i}", context, prompts, title=article["title"])
            rule = make_rule(method, lesson, passed, cfg, run_id=f"bench-dream-{i}-{method}",
                             questions=questions)
            row["methods"][method] = {"prompts": len(prompts), "points": _train(
                lm, lesson, cfg, questions, golds, over_s, over_tok, log, rule=rule)}
        rows.append(row)
    return summarize(cfg, rows, reading_base, time.time() - started)


def reason_key(reason: str) -> str:
    """A rejection reason without its numbers: "no reward spread (all fail)", ..."""
    if reason.startswith("no reward spread"):
        kind = reason.split("(", 1)[1].split(":")[0] if "(" in reason else "?"
        return f"no reward spread ({kind})"
    return reason.split(":")[0].split(" (")[0]


def _dream_stats(lm, context, title: str, cfg: DreamBenchConfig, log) -> tuple[dict, list]:
    """Write and gate one session's dreams; the counts, rejection reasons and tasks."""
    writing, report, dream_s = dream_session(lm, context, title, cfg.dream_options(),
                                             say=lambda s: log("    " + s))
    verdicts = {v.task: v for v in report.verdicts}
    passed = [t for t in writing.tasks if verdicts[t.id].passed]
    reasons: dict[str, int] = {}
    for v in report.verdicts:
        if not v.passed:
            reasons[reason_key(v.reason)] = reasons.get(reason_key(v.reason), 0) + 1
    problems: dict[str, int] = {}
    for t in writing.dropped:
        problems[t.problem] = problems.get(t.problem, 0) + 1
    c = writing.counts()
    dreamed = {"seconds": dream_s, "tokens": writing.tokens + report.tokens, **c,
               "passed": len(passed),
               "passed_model": sum(t.source not in RULE_SOURCES for t in passed),
               "passed_by_rule": sum(t.source in RULE_SOURCES for t in passed),
               "rejections": reasons, "parse_problems": problems,
               "questions": [t.question for t in passed],
               "tasks": [{"q": t.question, "a": t.answers, "source": t.source,
                          "attempt": t.attempt, "passed": verdicts[t.id].passed,
                          "why": verdicts[t.id].reason,
                          "teacher": verdicts[t.id].teacher_answer.strip()[:80]}
                         for t in writing.tasks],
               "dropped": [{"raw": t.raw.strip()[:120], "problem": t.problem,
                            "attempt": t.attempt, "sentence": t.sentence[:120]}
                           for t in writing.dropped]}
    return dreamed, passed


DREAM_COUNTS = ("units", "written", "parsed", "parsed_first_attempt", "by_rule", "usable",
                "passed", "passed_model", "passed_by_rule", "no_span")


def tasks_only(cfg: DreamBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Write and gate the dreams of each session, no training: how many of the model's
    attempts parse, how many tasks pass the gate, and why the others do not."""
    articles = select_articles(cfg)
    started = time.time()
    lm = load_model(cfg.model)
    rows = []
    for i, article in enumerate(articles):
        log(f"[{i + 1}/{len(articles)}] {article['title']} ({time.time() - started:.0f} s elapsed)")
        dreamed, _ = _dream_stats(lm, session_for(article), article["title"], cfg, log)
        rows.append({"article": article["title"], "dream": dreamed})
    totals = {k: sum(r["dream"][k] for r in rows) for k in DREAM_COUNTS}
    reasons: dict[str, int] = {}
    problems: dict[str, int] = {}
    for r in rows:
        for k, v in r["dream"]["rejections"].items():
            reasons[k] = reasons.get(k, 0) + v
        for k, v in r["dream"]["parse_problems"].items():
            problems[k] = problems.get(k, 0) + v
    return {"config": {**asdict(cfg), "methods": [], "budgets": list(cfg.budgets)},
            "tasks_only": True, "rows": rows, "totals": totals, "rejections": reasons,
            "parse_problems": problems, "seconds": time.time() - started,
            "seconds_per_session": sum(r["dream"]["seconds"] for r in rows) / max(len(rows), 1),
            "tokens_per_session": sum(r["dream"]["tokens"] for r in rows) / max(len(rows), 1),
            "machine": machine(), "date": date.today().isoformat()}


def rates(t: dict) -> dict:
    """Parse rate (the model's attempts), gate pass rates (of the model's parsed tasks, of the
    rule-made tasks, of all usable tasks)."""
    return {"parse_rate": t["parsed"] / max(t["written"], 1),
            "first_attempt_parse_rate": t["parsed_first_attempt"]
            / max(t["units"] if t["units"] else t["written"], 1),
            "gate_rate_model": t["passed_model"] / max(t["parsed"], 1),
            "gate_rate_by_rule": t["passed_by_rule"] / max(t["by_rule"], 1),
            "gate_rate": t["passed"] / max(t["usable"], 1)}


def markdown_tasks(result: dict, command: str) -> str:
    t, cfg = result["totals"], result["config"]
    r = rates(t)
    lines = [f"# Dreamed tasks: parse and gate rates ({cfg['split']} split, "
             f"{len(result['rows'])} sessions, writer {cfg['style']}, {cfg['attempts']} "
             f"attempts, fallback {cfg['fallback']})", "",
             f"Command: `{command}`  ",
             f"Date: {result['date']}; machine: {result['machine']}; total "
             f"{result['seconds'] / 60:.1f} min; {result['seconds_per_session']:.0f} s and "
             f"{result['tokens_per_session']:.0f} tokens per session (writing and gating)", "",
             f"- units asked for (answer spans or sentences): {t['units']}; sentences without an "
             f"answer span: {t['no_span']}",
             f"- the model's attempts: {t['written']}, parsed {t['parsed']} (parse rate "
             f"{r['parse_rate']:.0%}; {t['parsed_first_attempt']} on the first attempt)",
             f"- rule-made tasks ({cfg['fallback']} fallbacks or the rule style; not the "
             f"model's): {t['by_rule']}",
             f"- passed the gate: {t['passed']} of {t['usable']} usable tasks "
             f"({r['gate_rate']:.0%}): the model's {t['passed_model']}/{t['parsed']} "
             f"({r['gate_rate_model']:.0%}), rule-made {t['passed_by_rule']}/{t['by_rule']} "
             f"({r['gate_rate_by_rule']:.0%})",
             f"- parse failures: {result['parse_problems'] or 'none'}",
             f"- gate rejections: {result['rejections'] or 'none'}", "",
             "| session | units | attempts | parsed | rule-made | passed (model + rule) | s |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        d = row["dream"]
        lines.append(f"| {row['article']} | {d['units']} | {d['written']} | {d['parsed']} | "
                     f"{d['by_rule']} | {d['passed']} ({d['passed_model']} + {d['passed_by_rule']}) | "
                     f"{d['seconds']:.0f} |")
    lines += ["", "Tasks that passed the gate:", ""]
    for row in result["rows"]:
        for task in row["dream"]["tasks"]:
            if task["passed"]:
                lines.append(f"- ({task['source']}) {task['q']} -> {' | '.join(task['a'])}")
    return "\n".join(lines) + "\n"


def summarize(cfg: DreamBenchConfig, rows: list[dict], reading_base: float, seconds: float) -> dict:
    total = sum(r["questions"] for r in rows)
    base = sum(r["base"] for r in rows) / total
    ceiling = sum(r["in_context"] for r in rows) / total
    gap = ceiling - base
    table = []
    for m in cfg.methods:
        n_points = len(rows[0]["methods"][m]["points"])
        for k in range(n_points):
            pts = [r["methods"][m]["points"][k] for r in rows]
            after = sum(p["after"] for p in pts) / total
            readings = [p["reading"] for p in pts if p["reading"] is not None]
            table.append({
                "method": m, "budget_steps": pts[0]["budget"], "after": after,
                "gain_pts": 100 * (after - base),
                "transfer_ratio": (after - base) / gap if gap > 0 else float("nan"),
                "kl_to_base": sum(p["kl_to_base"] for p in pts) / len(pts),
                "reading_drop_pts": 100 * (reading_base - sum(readings) / len(readings))
                if readings else 0.0,
                "seconds_per_session": sum(p["seconds"] for p in pts) / len(pts),
                "tokens_per_session": sum(p["tokens"] for p in pts) / len(pts),
                "untrained_sessions": sum(bool(p.get("untrained")) for p in pts),
            })
    dreams = [r["dream"] for r in rows if "dream" in r]
    return {"config": {**asdict(cfg), "methods": list(cfg.methods), "budgets": list(cfg.budgets)},
            "questions": total, "base": base, "in_context": ceiling,
            "reading_base": reading_base, "table": table, "rows": rows, "seconds": seconds,
            "dream_totals": {k: sum(d[k] for d in dreams) for k in DREAM_COUNTS}
            if dreams else {},
            "machine": machine(), "date": date.today().isoformat()}


def machine() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} threads, Python "
            f"{sys.version.split()[0]}, torch {torch.__version__}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in result["config"]["methods"]:
        pts = [t for t in result["table"] if t["method"] == m]
        ax.plot([t["seconds_per_session"] for t in pts], [t["gain_pts"] for t in pts],
                marker="o", label=m)
        for t in pts:
            if t["budget_steps"]:
                ax.annotate(f"{t['budget_steps']} st", (t["seconds_per_session"], t["gain_pts"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(100 * (result["in_context"] - result["base"]), color="grey", linestyle="--",
               linewidth=1, label="session in context")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("compute per session (seconds, 2 CPU cores)")
    ax.set_ylabel("no-context accuracy gain over base (points)")
    ax.set_title(f"Gain vs compute ({result['config']['split']} split, "
                 f"{len(result['rows'])} sessions, {result['questions']} questions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict, command: str, png: str) -> str:
    d = result.get("dream_totals") or {}
    lines = [f"# Dreaming vs compact vs OPSD ({result['config']['split']} split, "
             f"{len(result['rows'])} sessions, {result['questions']} questions)", "",
             f"Command: `{command}`  ",
             f"Date: {result['date']}; machine: {result['machine']}; total "
             f"{result['seconds'] / 60:.1f} min", "",
             f"Base (no context): {result['base']:.1%}; session in context: "
             f"{result['in_context']:.1%}; in-context reading on unseen passages (base): "
             f"{result['reading_base']:.1%}."]
    if d:
        lines += ["", f"Dreams (writer {result['config'].get('style', 'qa')}): {d['written']} "
                      f"tasks written by the model, {d['parsed']} parsed "
                      f"({d['parsed'] / max(d['written'], 1):.0%}), {d['by_rule']} rule-made "
                      f"(fallback {result['config'].get('fallback', 'cloze')}); {d['passed']} "
                      f"passed the gate ({d['passed_model']} of the model's, "
                      f"{d['passed_by_rule']} rule-made)."]
    lines += ["", "| method | budget (steps) | no-context accuracy | gain (pts) | transfer ratio "
              "| KL to base | reading drop (pts) | s / session | tokens / session |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in result["table"]:
        note = f" ({t['untrained_sessions']} untrained)" if t.get("untrained_sessions") else ""
        lines.append(f"| {t['method']}{note} | {t['budget_steps'] or '-'} | {t['after']:.1%} | "
                     f"{t['gain_pts']:+.1f} | {t['transfer_ratio']:.3f} | {t['kl_to_base']:.3f} | "
                     f"{t['reading_drop_pts']:+.1f} | {t['seconds_per_session']:.0f} | "
                     f"{t['tokens_per_session']:.0f} |")
    lines += ["", "(n untrained): sessions where no dreamed task passed the gate, so nothing "
              "was trained; their accuracy is the base's and their compute the dreaming's.",
              "", f"![gain vs compute]({png})", "", "Per session:", ""]
    for r in result["rows"]:
        dr = r.get("dream")
        extra = (f"; dreams {dr['written']} written / {dr['parsed']} parsed / {dr['by_rule']} "
                 f"rule-made / {dr['passed']} passed (rejections: {dr['rejections']})" if dr else "")
        per = ", ".join(f"{m} {'/'.join(str(p['after']) for p in v['points'])}"
                        for m, v in r["methods"].items())
        lines.append(f"- {r['article']}: base {r['base']}/{r['questions']}, in context "
                     f"{r['in_context']}/{r['questions']}; after: {per}{extra}")
    return "\n".join(lines) + "\n"
