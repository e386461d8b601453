"""`onthejob bench conventions`: a team's conventions taught in co-work sessions and
consolidated per tenant, against the convention kept as memory in the system prompt
(bench/conventions.py). `--screen` measures which conventions the model follows in context."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from onthejob.bench import finite, names
from onthejob.envs.cli import bench_subparsers
from onthejob.learn.cli import add_opsd_options, opsd_options


def _default_squad() -> Path:
    """../shared/data/squad_seal_val.json beside the checkout (a worktree's is one level up)."""
    here = Path(__file__).resolve()
    for root in here.parents[3:6]:
        path = root / "shared" / "data" / "squad_seal_val.json"
        if path.exists():
            return path
    return here.parents[3].parent / "shared" / "data" / "squad_seal_val.json"


DEFAULT_SQUAD = _default_squad()
SMOKE = {"n": 2, "examples": 1, "visits": 0.5, "max_tokens": 8, "general_items": 3,
         "reading_items": 0, "retention": 2}


def register(sub: argparse._SubParsersAction) -> None:
    bsub = bench_subparsers(sub)
    p = bsub.add_parser(
        "conventions", help="a team's conventions learned into its adapter, against memory",
        description="Per convention one tenant: a co-work session teaches it (stated up front, "
        "or as a correction), the session is consolidated, and the held-out eval prompts are "
        "answered without it; adherence is checked by program (data/conventions.json). Rows: "
        "base, in context, memory (the rule in the system prompt), opsd, sft, notes. Also: "
        "isolation (tenant B's adapter on A's prompts), a retention chain (one tenant, N "
        "conventions, gate on), forgetting. Prints progress with rates and ETA; writes "
        "report.md and report.json (and a plot) under --out. --screen instead measures which "
        "conventions the model follows with the instruction in context.")
    p.add_argument("--conventions", default="",
                   help="comma-separated ids (default: every convention the screen kept)")
    p.add_argument("-n", "--n", type=int, default=None, help="the first N of them")
    p.add_argument("--methods", default="opsd,sft,notes",
                   help="consolidation methods, from opsd, sft, notes (default %(default)s)")
    p.add_argument("--form", default="mixed", choices=("statement", "correction", "mixed"),
                   help="how the session teaches: stated up front, as a correction after a "
                   "wrong answer, or alternating between conventions (default %(default)s)")
    p.add_argument("--review", default="none", choices=("none", "rule", "rule-after"),
                   help="what the session's review says: nothing, or the convention's rule in "
                   "the user's words (the memory row's words), which the teacher reads in its "
                   "system prompt before the session (rule) or after it, as `onthejob "
                   "consolidate` gives a review's words (rule-after) (default %(default)s)")
    p.add_argument("--examples", type=int, default=None,
                   help="train prompts the session asks, answered by the model (default 3)")
    p.add_argument("--visits", type=float, default=None,
                   help="the budget: visits per practice prompt, the same steps for every "
                   "method (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply budget; a convention that needs more says so (default 48)")
    p.add_argument("--no-isolation", action="store_true", help="skip the cross-tenant leak part")
    p.add_argument("--retention", type=int, default=None,
                   help="conventions one tenant learns in sequence, gate on (default 0: none)")
    p.add_argument("--no-gate", action="store_true",
                   help="retention chain: promote every candidate")
    p.add_argument("--shared", metavar="ID", default=None,
                   help="the shared-adapter part: three tenants that allow shared learning "
                   "teach convention ID, their sessions become the shared adapter, and a tenant "
                   "that allows it and one that does not answer ID's eval prompts (default: off)")
    p.add_argument("--general-items", type=int, default=None,
                   help="general questions for forgetting (default 24)")
    p.add_argument("--reading-items", type=int, default=None,
                   help="in-context reading items from articles 1000+ of --squad (default 6)")
    p.add_argument("--squad", default=str(DEFAULT_SQUAD),
                   help="squad_seal_val.json for the reading items (default %(default)s; "
                   "missing: no reading items)")
    add_opsd_options(p)
    p.add_argument("--data", help="conventions file (default: the package's)")
    p.add_argument("--screen", action="store_true",
                   help="only the screen: adherence with the instruction in context, as memory "
                   "and at base, over every convention; writes screen.md and screen.json")
    p.add_argument("--record", action="store_true",
                   help="with --screen: write the figures (and kept/dropped) into --data")
    p.add_argument("--smoke", action="store_true",
                   help="CI size: 2 conventions, 1 example, tiny budgets (explicit flags win)")
    p.add_argument("--model", help="local HF model directory (default: embedded)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--work", metavar="DIR", default=None,
                   help="keep each finished consolidation (and the opsd adapters) in DIR; a "
                   "rerun with the same settings and DIR resumes after the last one "
                   "(default: a temporary folder, removed at the end)")
    p.add_argument("--out", default="docs/results/conventions/",
                   help="output folder (report.md, report.json, retention.png; screen.md, "
                   "screen.json with --screen); default %(default)s")
    p.set_defaults(func=_conventions)




def _conventions(args: argparse.Namespace) -> int:
    from onthejob.bench import conventions as bench
    from onthejob.bench.convention_checks import data_path, load
    from onthejob.bench.conventions_report import markdown, plot_retention, screen_markdown

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "onthejob " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    say = lambda s: print(s, flush=True)  # noqa: E731
    if args.screen:
        from onthejob.model import load_model

        try:
            conventions = load(args.data, kept_only=False)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.conventions:
            conventions = [c for c in conventions if c.id in set(names(args.conventions))]
        lm = load_model(args.model, device=args.device)
        result = bench.screen(lm, conventions, args.max_tokens or 48, log=say)
        (out / "screen.json").write_text(json.dumps(finite(result), indent=1, ensure_ascii=False))
        (out / "screen.md").write_text(screen_markdown(result, command))
        print(f"wrote {out / 'screen.md'} and {out / 'screen.json'}")
        if args.record:
            bench.record_screen(result, args.data or data_path())
            print(f"recorded the screen in {args.data or data_path()}")
        return 0
    sizes = {"n": None, "examples": 3, "visits": 8.0, "max_tokens": 48, "general_items": 24,
             "reading_items": 6, "retention": 0, **(SMOKE if args.smoke else {})}
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    opsd = opsd_options(args)
    if args.smoke:
        opsd.prompts_per_step, opsd.max_new_tokens, opsd.teacher_tokens = 2, 8, 8
    squad = args.squad if Path(args.squad).exists() else None
    if squad is None and sizes["reading_items"]:
        print(f"note: {args.squad} not found: no in-context reading items", file=sys.stderr)
    cfg = bench.ConventionsConfig(
        conventions=names(args.conventions), n=sizes["n"], methods=names(args.methods),
        form=args.form, review=args.review, examples=sizes["examples"], visits=sizes["visits"], lr=args.lr,
        seed=args.seed, max_tokens=sizes["max_tokens"], isolation=not args.no_isolation,
        retention=sizes["retention"], gate=not args.no_gate, shared=args.shared,
        general_items=sizes["general_items"], reading_items=sizes["reading_items"] if squad else 0,
        squad=squad, opsd=opsd, notes_tokens=16 if args.smoke else 160, data=args.data,
        model=args.model, device=args.device, work=args.work)
    try:
        result = bench.run(cfg, log=say)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["command"] = command
    plots = {}
    if result["retention"]:
        plots["retention"] = plot_retention(result, str(out / "retention.png"))
    (out / "report.json").write_text(json.dumps(finite(result), indent=1, ensure_ascii=False,
                                                default=str))
    (out / "report.md").write_text(markdown(result, command, plots, str(out)))
    for line in bench.headlines(result):
        print(line)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}"
          + "".join(f" and {p}" for p in plots.values()))
    return 0
