"""`onthejob bench knowledge` and `onthejob bench generate`: benchmarks of the model and of
learning. Each writes a markdown report (and JSON) under docs/results/ unless told otherwise."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from onthejob.envs.cli import _bench_subparsers

DEFAULT_DATA = str(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "squad_seal_val.json")


def register(sub: argparse._SubParsersAction) -> None:
    bsub = _bench_subparsers(sub)
    k = bsub.add_parser("knowledge", help="knowledge transfer: SQuAD passages as sessions",
                        description="Consolidate SQuAD passages (one session each) with each "
                        "method and measure no-context accuracy before/after against the "
                        "in-context ceiling. See docs/BENCHMARKS.md for the protocol.")
    k.add_argument("--data", default=DEFAULT_DATA, help="squad_seal_val.json (default: %(default)s)")
    k.add_argument("--split", default="dev", choices=("dev", "test"))
    k.add_argument("--sessions", type=int, default=4, help="articles (sessions) to use")
    k.add_argument("--methods", default="opsd,sft,notes")
    k.add_argument("--steps", type=int, default=20)
    k.add_argument("--lr", type=float, default=1e-3)
    k.add_argument("--teacher-mix", type=float, default=0.5,
                   help="OPSD: share of rows answered by the teacher (GKD lambda)")
    k.add_argument("--divergence", default="reverse_kl", choices=("reverse_kl", "forward_kl", "jsd"))
    k.add_argument("--max-questions", type=int, default=15)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--model", help="local HF model directory (default: embedded)")
    k.add_argument("--out", default="docs/results/knowledge", help="output path prefix (.md, .json)")
    k.set_defaults(func=_knowledge)

    g = bsub.add_parser("generate", help="batched generation vs model.generate one at a time",
                        description="Throughput of onthejob's batched generation against plain "
                        "transformers model.generate one prompt at a time, same prompts and "
                        "lengths, at batch 1 and 8; plus cold and cached model load times.")
    g.add_argument("--model", help="local HF model directory (default: embedded)")
    g.add_argument("--tokens", type=int, default=48, help="new tokens per prompt")
    g.add_argument("--prompts", type=int, default=8)
    g.add_argument("--out", default="docs/results/generate", help="output path prefix (.md, .json)")
    g.set_defaults(func=_generate)


def _write(prefix: str, result: dict, text: str) -> None:
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(prefix + ".json").write_text(json.dumps(result, indent=1, default=str))
    Path(prefix + ".md").write_text(text)
    print(f"wrote {prefix}.md and {prefix}.json")


def _knowledge(args: argparse.Namespace) -> int:
    from onthejob.bench.knowledge import KnowledgeConfig, markdown, run
    from onthejob.learn.opsd import OpsdConfig

    if not Path(args.data).exists():
        print(f"error: {args.data} not found; pass --data PATH to squad_seal_val.json", file=sys.stderr)
        return 2
    cfg = KnowledgeConfig(data=args.data, split=args.split, sessions=args.sessions,
                          methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                          steps=args.steps, lr=args.lr, seed=args.seed,
                          max_questions=args.max_questions, model=args.model,
                          opsd=OpsdConfig(teacher_mix=args.teacher_mix, divergence=args.divergence))
    result = run(cfg, log=lambda s: print(s, flush=True))
    command = "onthejob " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    _write(args.out, result, markdown(result, command))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from onthejob.bench.generate import markdown, run

    result = run(args.model, args.prompts, args.tokens)
    command = "onthejob " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    _write(args.out, result, markdown(result, command))
    return 0
