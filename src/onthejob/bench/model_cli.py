"""`onthejob bench knowledge` and `onthejob bench generate`: benchmarks of the model and of
learning. Each writes a markdown report (and JSON) under docs/results/ unless told otherwise."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from onthejob.bench import finite, names
from onthejob.envs.cli import bench_subparsers
from onthejob.learn.cli import (
    add_lr_schedule_option,
    add_opsd_options,
    add_practice_option,
    opsd_options,
)

# Default sizes of `bench knowledge` (fit 60 minutes on 2 CPU cores: docs/BENCHMARKS.md) and --smoke.
SIZES = {"sessions": 2, "seeds": 2, "steps": 6, "visits": 8.0, "lrs": "3e-3", "sequential": 10,
         "reading_items": 6, "general_items": 24, "max_questions": 10}
SMOKE = {"sessions": 1, "seeds": 2, "steps": 1, "visits": 0.0, "lrs": "3e-3", "sequential": 2,
         "reading_items": 2, "general_items": 3, "max_questions": 2}
DEFAULT_DATA = str(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "squad_seal_val.json")


def register(sub: argparse._SubParsersAction) -> None:
    bsub = bench_subparsers(sub)
    k = bsub.add_parser("knowledge", help="knowledge transfer: SQuAD passages as sessions",
                        description="Consolidate SQuAD passages (one session each) with each "
                        "method and seed and measure no-context accuracy before/after against the "
                        "in-context ceiling (transfer ratio), a learning-rate sweep (gain vs "
                        "forgetting), sequential consolidation (retention curve), forgetting probes "
                        "and cost. Writes markdown, JSON and PNG plots. Protocol and default sizes: "
                        "docs/BENCHMARKS.md.")
    k.add_argument("--data", default=DEFAULT_DATA, help="squad_seal_val.json (default: %(default)s)")
    k.add_argument("--split", default="test", choices=("dev", "test", "extra"),
                   help="dev = articles 0-199 (tune here), test = 200-399 (report), extra = "
                   "400-999 (no split's: development on subjects the dev split lacks, such as "
                   "Steam engine 574-619 or Geology 911-935); default %(default)s")
    k.add_argument("--first", type=int, default=0,
                   help="skip this many articles of the split (default 0)")
    k.add_argument("--stride", type=int, default=1,
                   help="take every N-th article of the split from --first on; 5 on the test "
                        "split samples its four subjects alike (default 1: consecutive articles)")
    k.add_argument("--phrases", type=int, default=None,
                   help="lowercase noun phrases asked per sentence of the material beside its "
                        "names and numbers (0: none; default: consolidate's, "
                        "learn/practice.py PHRASES_PER_SENTENCE)")
    add_practice_option(k)
    k.add_argument("--sessions", type=int, default=None,
                   help=f"articles consolidated independently from the base (default {SIZES['sessions']})")
    k.add_argument("--methods", default="opsd,sft,notes",
                   help="comma-separated, from: opsd (the default recipe), its ablation variants "
                   "opsd-onpolicy-fkl, opsd-onpolicy-rkl, opsd-then-onpolicy, opsd-anchors-0.4 "
                   "(the same steps, 40 %% of the rows anchors), opsd-base-teacher (in "
                   "--rounds, the base model reads each new session), opsd-stacked (in --rounds, each "
                   "round a fresh adapter over the earlier rounds' frozen ones), and sft, notes, "
                   "dream, compact (compact: joint part only); default %(default)s")
    k.add_argument("--seeds", type=int, default=None,
                   help="seeds per method: mean and spread of the transfer ratio; forgetting "
                        f"probes run on the first seed (default {SIZES['seeds']})")
    k.add_argument("--steps", type=int, default=None,
                   help=f"training steps per session when --visits is 0 (default {SIZES['steps']})")
    k.add_argument("--visits", type=float, default=None,
                   help="the budget: visits per practice prompt, steps follow from it, the "
                   f"same for every method (0: --steps; default {SIZES['visits']})")
    k.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate, consolidate's default (default %(default)s)")
    add_lr_schedule_option(k)
    k.add_argument("--lrs", default=None,
                   help="extra learning rates for sft and opsd, comma-separated, first seed only: "
                        f"the gain-vs-forgetting sweep ('' for none; default {SIZES['lrs']})")
    k.add_argument("--sequential", type=int, default=None,
                   help="sessions consolidated one after another into one adapter chain for the "
                        f"retention curve (0: none; default {SIZES['sequential']})")
    k.add_argument("--sequential-methods", default="opsd",
                   help="methods run sequentially (default %(default)s)")
    k.add_argument("--joint", type=int, default=0,
                   help="also consolidate the first N sessions together into one adapter per "
                        "method, as `onthejob consolidate` does with a tenant's batch (default 0: no)")
    k.add_argument("--rounds", type=int, default=1,
                   help="consolidate the joint sessions in this many consecutive batches, each "
                        "version a child of the last, as a tenant's nightly runs do; the "
                        "accuracy on the sessions so far is logged after each (default 1)")
    k.add_argument("--joint-steps", type=int, default=None,
                   help="training steps of each joint consolidation (default: --steps)")
    k.add_argument("--reading-items", type=int, default=None,
                   help=f"in-context reading items from articles 1000+ (default {SIZES['reading_items']})")
    k.add_argument("--general-items", type=int, default=None,
                   help=f"general questions from the shipped set (default {SIZES['general_items']})")
    add_opsd_options(k)
    k.add_argument("--notes-per-session", type=int, default=4,
                   help="notes baseline: notes written per session (default %(default)s)")
    k.add_argument("--max-questions", type=int, default=None,
                   help=f"questions per session (default {SIZES['max_questions']})")
    k.add_argument("--seed", type=int, default=0, help="first seed")
    k.add_argument("--smoke", action="store_true",
                   help="CI size: 1 session, 2 seeds, 1 step, a 2-session chain, 2 lrs, few probes "
                        "(explicit flags still win)")
    k.add_argument("--keep-adapters", action="store_true",
                   help="keep the sequential chain's adapters under OUT's adapters/ folder")
    k.add_argument("--model", help="local HF model directory (default: embedded)")
    k.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    k.add_argument("--bf16", default="auto", choices=("auto", "on", "off"),
                   help="bf16 autocast for training; auto = only where the hardware has native "
                        "bf16 (emulated bf16 is ~7x slower on an AVX2-only CPU); default %(default)s")
    k.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a CPU "
                        "shared with other jobs)")
    k.add_argument("--out", default="docs/results/knowledge",
                   help="output prefix (PREFIX.md, PREFIX.json, PREFIX-*.png) or, ending in '/', "
                        "a folder (report.md, report.json, *.png); default %(default)s")
    k.set_defaults(func=_knowledge)

    g = bsub.add_parser("generate", help="generation tokens/s at batch 1, 8, 32, before vs after",
                        description="Tokens/s of a generation engine at batch 1, 8 and 32 with a "
                        "LoRA adapter applied, time to first token, and greedy agreement; with "
                        "--before, the speedup over figures the same measurement took on an "
                        "older checkout (see src/onthejob/bench/generate.py).")
    g.add_argument("--model", help="local HF model directory (default: embedded)")
    g.add_argument("--engine", default="torch",
                   help="engines to measure, comma-separated, on the same prompts and adapter: "
                   "torch (at each of --precisions), llamacpp (llama.cpp on the shipped GGUF, "
                   "once; its greedy answers are compared with torch float32's) "
                   "(default %(default)s)")
    g.add_argument("--precisions", default="float32,bfloat16,int8",
                   help="comma-separated torch precisions (float32, bfloat16, int8); those that "
                   "cannot run here (no int8 kernel) are skipped, saying why "
                   "(default: %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="also measure each torch precision with compiled decode steps "
                   "(torch.compile; its compile time is reported)")
    g.add_argument("--batches", default="1,8,32")
    g.add_argument("--tokens", type=int, default=32, help="new tokens per row")
    g.add_argument("--repeats", type=int, default=3, help="calls per figure (the median is kept)")
    g.add_argument("--before", metavar="JSON", help="figures of the same measurement on older code")
    g.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the report of "
                   "an earlier run's JSON (e.g. with --before, once that run is done)")
    g.add_argument("--shared-context", type=int, default=800, metavar="TOKENS",
                   help="also measure the teacher's rows: 16 questions after one session of "
                   "this many tokens, its context encoded once vs every row whole (0: skip)")
    g.add_argument("--only-shared", action="store_true",
                   help="measure only the --shared-context figure (no batch table)")
    g.add_argument("--out", default="docs/results/generate", help="output path prefix (.md, .json)")
    g.set_defaults(func=_generate)


def _write(prefix: str, result: dict, text: str) -> None:
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(prefix + ".json").write_text(json.dumps(result, indent=1, default=str))
    Path(prefix + ".md").write_text(text)
    print(f"wrote {prefix}.md and {prefix}.json")


def _knowledge(args: argparse.Namespace) -> int:
    from onthejob.bench.knowledge import KnowledgeConfig, markdown, run
    from onthejob.bench.knowledge_report import plot_all
    if not Path(args.data).exists():
        print(f"error: {args.data} not found; pass --data PATH to squad_seal_val.json", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sizes = {**SIZES, **(SMOKE if args.smoke else {})}
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    try:
        lrs = [float(x) for x in str(sizes["lrs"]).split(",") if x.strip()]
    except ValueError:
        print(f"error: --lrs {sizes['lrs']!r} is not a comma-separated list of numbers", file=sys.stderr)
        return 2
    opsd = opsd_options(args)
    if args.smoke:
        opsd.prompts_per_step, opsd.samples_per_prompt, opsd.max_new_tokens = 2, 1, 8
        opsd.teacher_tokens = 8
    cfg = KnowledgeConfig(data=args.data, split=args.split, first=args.first, stride=args.stride,
                          sessions=sizes["sessions"], practice_kinds=args.practice,
                          span_phrasings=args.span_phrasings, bare_phrases=args.bare_phrases,
                          **({} if args.phrases is None else {"phrases_per_sentence": args.phrases}),
                          methods=names(args.methods), steps=sizes["steps"],
                          visits=sizes["visits"] or None, lr=args.lr, lr_schedule=args.lr_schedule,
                          seed=args.seed, seeds=sizes["seeds"], max_questions=sizes["max_questions"],
                          sequential=sizes["sequential"],
                          sequential_methods=names(args.sequential_methods), lrs=lrs,
                          joint=args.joint, joint_steps=args.joint_steps, rounds=args.rounds,
                          notes_per_session=args.notes_per_session,
                          reading_items=sizes["reading_items"], general_items=sizes["general_items"],
                          opsd=opsd, notes_tokens=16 if args.smoke else 160,
                          bf16={"auto": None, "on": True, "off": False}[args.bf16],
                          model=args.model, device=args.device)
    folder = args.out.endswith("/") or Path(args.out).is_dir()
    prefix = str(Path(args.out) / "report") if folder else args.out
    plot_prefix = str(Path(args.out)) + "/" if folder else args.out + "-"
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    adapters = str(Path(prefix).parent / "adapters") if args.keep_adapters else None
    try:
        result = run(cfg, log=lambda s: print(s, flush=True), adapters_dir=adapters,
                     partial=lambda part: Path(prefix + "-partial.json").write_text(
                         json.dumps(finite(part), indent=1, default=str)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "onthejob " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    plots = plot_all(result, plot_prefix)
    result["plots"] = plots
    text = markdown(result, command, plots, str(Path(prefix).parent))
    _write(prefix, finite(result), text)
    for path in plots.values():
        print(f"wrote {path}")
    return 0




def _generate(args: argparse.Namespace) -> int:
    import torch

    from onthejob.bench.generate import compare, markdown, run
    from onthejob.model.engine import ENGINES, OPTIONAL, PRECISIONS, precision_problem

    for name in names(args.engine):
        if name in OPTIONAL and name not in ENGINES:
            print(f"error: the {name} engine is not installed here: {OPTIONAL[name]}",
                  file=sys.stderr)
            return 2
        if name not in ENGINES:
            print(f"error: unknown engine {name!r}: choose one of {', '.join(sorted(ENGINES))}",
                  file=sys.stderr)
            return 2
    precisions = names(args.precisions)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        print(f"error: --precisions {args.precisions!r}: choose from {', '.join(PRECISIONS)}",
              file=sys.stderr)
        return 2
    for name in list(precisions):
        problem = precision_problem(name, torch.device("cpu"))
        if problem:
            print(f"{name} skipped: {problem}")
            precisions.remove(name)
    if args.before and not Path(args.before).exists():
        print(f"--before {args.before} does not exist yet: it is read when this run is done "
              "(the before measurement may still be running)")
    try:
        batches = [int(b) for b in names(args.batches)]
    except ValueError:
        print(f"error: --batches {args.batches!r} is not a comma-separated list of integers",
              file=sys.stderr)
        return 2
    if args.render:
        try:
            result = json.loads(Path(args.render).read_text())
        except (OSError, ValueError) as exc:
            print(f"error: cannot read --render {args.render}: {exc}", file=sys.stderr)
            return 2
    else:
        if args.only_shared:
            precisions = []
        result = run(args.engine, precisions, batches, args.tokens, args.repeats, args.model,
                     shared_context=args.shared_context, compiled=args.compile)
        result["command"] = "onthejob " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    before = None
    if args.before:
        try:
            before = json.loads(Path(args.before).read_text())
        except (OSError, ValueError) as exc:
            # The figures just measured are written all the same; --render adds --before later.
            print(f"warning: cannot read --before {args.before} ({exc}): writing without it; "
                  f"add it later with --render {args.out}.json --before FILE", file=sys.stderr)
    result["before"] = before
    result["compare"] = compare(result, before)
    _write(args.out, result, markdown(result, before, result["command"],
                                      before.get("command") if before else None))
    return 0

