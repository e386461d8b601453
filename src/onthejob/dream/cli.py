"""`onthejob dream --session ID`, `onthejob dream show RUN_ID`, `onthejob bench dream`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from onthejob.dream.run import MODES, Budget, DreamOptions, dream, load_dream
from onthejob.dream.tasks import CHECKERS, FALLBACKS, STYLES
from onthejob.envs.cli import bench_subparsers
from onthejob.learn.cli import add_gate_options, add_opsd_options, gate_options, opsd_options
from onthejob.learn.loop import TrainConfig
from onthejob.store import Store
from onthejob.store.cli import command, db_option


def register(sub: argparse._SubParsersAction) -> None:
    db = db_option()
    d = sub.add_parser(
        "dream", parents=[db], help="write practice tasks from a session and train on them",
        description="The model, with the session in context, writes practice tasks about it "
        "(question, expected answer, optionally a checker run in the sandbox); each becomes an "
        "environment that must pass a gate (deterministic reset, the teacher solves it, empty "
        "and random answers fail, rewards spread across student samples); the model without "
        "the session trains on those that pass within --budget; the adapter goes through the "
        "consolidation gate. `onthejob dream show RUN_ID` lists the tasks and verdicts.")
    d.add_argument("--session", help="the session to dream about")
    d.add_argument("--tenant", help="the session's tenant")
    d.add_argument("--budget", default="20steps",
                   help="training compute cap: steps, tokens or minutes, e.g. 20, 20steps, "
                   "50000tokens, 5min (default: %(default)s)")
    d.add_argument("--mode", default="opsd", choices=MODES,
                   help="opsd: the session as teacher on the dreamed questions; grpo: the "
                   "dreamed checkers' rewards; both: alternate steps")
    d.add_argument("--checker", default="match", choices=CHECKERS,
                   help="match: normalized match / token F1; program: a model-written Python "
                   "check, run only in the sandbox")
    d.add_argument("--with-probes", action="store_true",
                   help="also train on consolidation's probes (dream+opsd)")
    d.add_argument("--max-tasks", type=int, default=24)
    _writer_options(d)
    d.add_argument("--group", type=int, default=6, help="student samples per task (gate, GRPO)")
    d.add_argument("--lr", type=float, default=3e-3, help="learning rate (default %(default)s)")
    d.add_argument("--rank", type=int, default=16, help="LoRA rank")
    add_opsd_options(d)
    add_gate_options(d)
    d.add_argument("--seed", type=int, default=0, help="training and gate seed")
    d.add_argument("--model", help="local HF model directory (default: embedded)")
    d.set_defaults(func=_dream)
    dsub = d.add_subparsers(dest="dream_command", metavar="ACTION")
    s = dsub.add_parser("show", parents=[db], help="a dream run's tasks and gate verdicts",
                        description="Each dreamed task of a run: its question, expected answer, "
                        "checker, and whether it passed the gate (and why not); then the tasks "
                        "dropped at parsing and the run's outcome.")
    s.add_argument("run_id", type=int)
    s.add_argument("--tenant", help="refuse a run of another tenant")
    s.add_argument("--json", action="store_true", help="print the whole record as JSON")
    s.set_defaults(func=command(_show))

    bench = bench_subparsers(sub)
    b = bench.add_parser(
        "dream", help="compact vs opsd vs dream vs dream+opsd on the knowledge benchmark",
        description="On SQuAD articles as sessions: the session's summary in context "
        "(compact), OPSD, dreaming, and dreaming+OPSD, each evaluated at several training "
        "budgets (steps): no-context accuracy, transfer ratio, KL to base on anchors, reading "
        "accuracy, seconds and tokens spent. Writes a markdown table, JSON and a PNG plot.")
    from onthejob.bench.model_cli import DEFAULT_DATA

    b.add_argument("--data", default=DEFAULT_DATA, help="squad_seal_val.json (default: %(default)s)")
    b.add_argument("--split", default="test", choices=("dev", "test"))
    b.add_argument("--sessions", type=int, default=2, help="articles (sessions) to use")
    b.add_argument("--articles",
                   help="comma-separated article indices within the split, instead of the "
                   "first --sessions (e.g. 0,20,54)")
    b.add_argument("--methods", default="compact,opsd,dream,dream+opsd",
                   help="some of compact, opsd, dream (OPSD on the dreamed questions), "
                   "dream+opsd, dream-grpo (GRPO on the dreamed environments), dream-both "
                   "(OPSD and GRPO on alternate steps) (default: %(default)s)")
    b.add_argument("--tasks-only", action="store_true",
                   help="only write and gate the dreams (no training, no evaluation): parse and "
                   "gate pass rates per session; writes OUT.md and OUT.json")
    _writer_options(b)
    b.add_argument("--grpo-starts", type=int, default=2,
                   help="dream-grpo/dream-both: dreamed tasks per GRPO step (default: %(default)s)")
    b.add_argument("--budgets", default="5,15", help="training steps at which to evaluate")
    b.add_argument("--lr", type=float, default=3e-3, help="learning rate (default %(default)s)")
    add_opsd_options(b)
    b.add_argument("--max-questions", type=int, default=15)
    b.add_argument("--group", type=int, default=6, help="student samples per dreamed task (gate)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--model", help="local HF model directory (default: embedded)")
    b.add_argument("--out", default="docs/results/dream", help="output path prefix (.md, .json, .png)")
    b.set_defaults(func=_bench)


def _writer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--style", default="span", choices=STYLES,
                   help="span: answers picked verbatim from the session by rules, the model "
                   "writes one question per answer; qa: the model writes question and answer "
                   "(needed for --checker program); rule: no model writing, every answer gets "
                   "a rule-made question (an ablation) (default: %(default)s)")
    p.add_argument("--attempts", type=int, default=3,
                   help="tries per task: the first greedy, the rest sampled (default: %(default)s)")
    p.add_argument("--fallback", default="rule", choices=FALLBACKS,
                   help="an answer span whose question did not parse after every attempt -> "
                   "rule: a question made from the sentence by rule (the span replaced by "
                   "'what year', 'who', ...); cloze: a fill-in-the-blank; both labeled and "
                   "counted apart from the model's tasks; none: dropped (default: %(default)s)")


def _dream(args: argparse.Namespace) -> int:
    from onthejob.model import load_model
    from onthejob.model.adapters import LoraSpec

    if not args.session or not args.tenant:
        print("error: give --session ID and --tenant NAME (or `onthejob dream show RUN_ID`)",
              file=sys.stderr)
        return 2
    try:
        budget = Budget.parse(args.budget)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    opts = DreamOptions(mode=args.mode, budget=budget, checker=args.checker,
                        max_tasks=args.max_tasks, with_probes=args.with_probes,
                        style=args.style, attempts=args.attempts, fallback=args.fallback,
                        train=TrainConfig(lr=args.lr, seed=args.seed,
                                          lora=LoraSpec(rank=args.rank, alpha=2 * args.rank)),
                        opsd=opsd_options(args), gate=gate_options(args))
    opts.env_gate.group, opts.env_gate.seed = args.group, args.seed

    def run(store: Store, args: argparse.Namespace) -> int:
        lm = load_model(args.model)
        out = dream(store, lm, args.tenant, args.session, opts)
        print(f"run {out.run_id}: {out.status}: {out.message}")
        print(f"  tasks written {out.written}, parsed {out.parsed}, rule-made {out.by_rule}, "
              f"passed the gate {out.passed}; see `onthejob dream show {out.run_id}`")
        return 0 if out.status in ("promoted", "nothing") else 3

    return command(run)(args)


def _show(store: Store, args: argparse.Namespace) -> int:
    run = store.get_run(args.run_id)
    if run.kind != "dream":
        raise ValueError(f"run {args.run_id} is a {run.kind} run, not a dream")
    if args.tenant and run.tenant != args.tenant:
        raise ValueError(f"tenant {args.tenant!r} has no dream run {args.run_id}")
    try:
        record = load_dream(args.run_id)
    except FileNotFoundError as exc:
        print(f"run {run.id}: {run.status} {run.progress}\n{run.error or ''}".rstrip())
        raise ValueError(str(exc)) from None
    if args.json:
        print(json.dumps({"run": {"status": run.status, "progress": run.progress,
                                  "error": run.error}, **record}, indent=1))
        return 0
    tasks = record["tasks"]
    passed = sum(t["gate"]["passed"] for t in tasks)
    print(f"dream run {run.id} ({run.status}) of session {record['session']} "
          f"({record['title'] or 'untitled'}), tenant {record['tenant']}, mode {record['mode']}, "
          f"budget {record['budget']}")
    counts = record.get("counts") or {"written": len(tasks) + len(record["dropped"]),
                                      "parsed": len(tasks)}
    by_rule = counts.get("by_rule", counts.get("cloze", 0))  # "cloze": records before 2026-11-23
    print(f"tasks: {counts['written']} written by the model, {counts['parsed']} parsed "
          f"({record['parse_rate']:.0%}), {by_rule} made by rule (fallback "
          f"{record.get('fallback', 'cloze')}); {passed} passed "
          f"the gate (writer: {record.get('style', 'qa')})")
    for i, t in enumerate(tasks, 1):
        g = t["gate"]
        check = f"program: {t['program']}" if t["checker"] == "program" else \
            f"match {' | '.join(t['answers'])}"
        mark = "PASS" if g["passed"] else "FAIL"
        source = t.get("source", "model")
        print(f"\n{i:>2}. [{mark}] ({source}) {t['question']}\n    checker: {check}\n"
              f"    teacher: {g['teacher_answer'].strip()[:80]!r} -> {g['teacher_reward']:.2f}; "
              f"empty {g['empty_reward']:.2f}, random {g['random_reward']:.2f}, "
              f"decoy {g['decoy_reward']:.2f}; group {[round(x, 2) for x in g['group_rewards']]}")
        if not g["passed"]:
            print(f"    why not: {g['reason']}")
    if record["dropped"]:
        print("\ndropped at parsing:")
        for t in record["dropped"]:
            print(f"  - {t['problem']} (attempt {t.get('attempt', 0) + 1}): "
                  f"{t['raw'].strip()[:90]!r}")
    outcome = record.get("outcome")
    if outcome:
        print(f"\noutcome: {outcome['status']}: {outcome['message']}")
    elif run.error:
        print(f"\nfailed: {run.error.splitlines()[0]}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from onthejob.bench.dream import (
        METHODS,
        DreamBenchConfig,
        markdown,
        markdown_tasks,
        plot,
        run,
        select_articles,
        tasks_only,
    )

    if not Path(args.data).exists():
        print(f"error: {args.data} not found; pass --data PATH to squad_seal_val.json",
              file=sys.stderr)
        return 2
    try:
        budgets = sorted({int(x) for x in args.budgets.split(",") if x.strip()})
    except ValueError:
        budgets = []
    if not budgets or budgets[0] < 1:
        print("error: --budgets takes comma-separated positive step counts, e.g. 5,15",
              file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        print(f"error: --methods takes some of {','.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        articles = ([int(x) for x in args.articles.split(",") if x.strip()]
                    if args.articles else None)
    except ValueError:
        articles = []
    if articles is not None and not articles:
        print("error: --articles takes comma-separated article indices, e.g. 0,20,54",
              file=sys.stderr)
        return 2
    cfg = DreamBenchConfig(data=args.data, split=args.split, sessions=args.sessions,
                           methods=methods,
                           budgets=budgets, lr=args.lr, seed=args.seed, group=args.group,
                           max_questions=args.max_questions, model=args.model,
                           articles=articles, style=args.style, attempts=args.attempts,
                           fallback=args.fallback, grpo_starts=args.grpo_starts,
                           opsd=opsd_options(args))
    command = "onthejob " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        select_articles(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.tasks_only:
        result = tasks_only(cfg, log=lambda s: print(s, flush=True))
        Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=str))
        Path(args.out + ".md").write_text(markdown_tasks(result, command))
        print(f"wrote {args.out}.md and {args.out}.json")
        return 0
    result = run(cfg, log=lambda s: print(s, flush=True))
    Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, args.out + ".png")
    Path(args.out + ".md").write_text(markdown(result, command, Path(args.out + ".png").name))
    print(f"wrote {args.out}.md, {args.out}.json and {args.out}.png")
    return 0
