"""`onthejob consolidate`, `onthejob adapters list|show|activate|rollback|export`,
`onthejob demo`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from onthejob.learn.consolidate import (
    MAX_AUTO_STEPS,
    METHODS,
    VISITS,
    ConsolidateOptions,
    consolidate,
    recommended_opsd,
)
from onthejob.learn.divergence import DIVERGENCES
from onthejob.learn.gate import GateConfig
from onthejob.learn.loop import LR_SCHEDULES, OPTIMIZERS, TrainConfig
from onthejob.learn.opsd import ANCHOR_TARGETS, TEACHER_FROM, OpsdConfig
from onthejob.learn.practice import BARE_PHRASES, KINDS, SPAN_PHRASINGS
from onthejob.model.adapters import LORA_MODULES, LoraSpec
from onthejob.store import Store, StoreError
from onthejob.store.cli import command, db_option, plain


def register(sub: argparse._SubParsersAction) -> None:
    db = db_option()
    c = sub.add_parser("consolidate", parents=[db], help="learn approved sessions into an adapter",
                       description="Train a candidate adapter from a tenant's approved (thumbs-up), "
                       "not yet consolidated sessions, check it with the promotion gate, and "
                       "activate it or reject it with the reason.")
    c.add_argument("--tenant", required=True)
    c.add_argument("--method", default="opsd", choices=METHODS, help="the learning rule")
    c.add_argument("--scope", default="tenant", choices=("tenant", "shared"),
                   help="shared: learn from every tenant that allows it into the shared adapter")
    c.add_argument("--sessions", nargs="+", default=(), metavar="ID", help="only these sessions")
    c.add_argument("--dry-run", action="store_true", help="show the plan and cost; train nothing")
    c.add_argument("--steps", type=int, default=None,
                   help="training steps (default: what --visits asks for, at most "
                   f"{MAX_AUTO_STEPS})")
    c.add_argument("--visits", type=float, default=VISITS,
                   help="the budget: visits per training probe (default %(default)s)")
    add_lora_options(c)
    add_practice_option(c)
    add_opsd_options(c)
    add_gate_options(c)
    c.add_argument("--seed", type=int, default=0, help="training seed")
    c.add_argument("--model", help="local HF model directory (default: embedded)")
    c.set_defaults(func=_consolidate)

    a = sub.add_parser("adapters", help="list, show, activate or roll back adapters",
                       description="A tenant's adapter versions with parents, metrics and status.")
    asub = a.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    for name, text in (("list", "list versions"), ("show", "one version in full"),
                       ("activate", "make a version active"),
                       ("rollback", "retire the active version; its parent becomes active")):
        p = asub.add_parser(name, parents=[db], help=text, description=text.capitalize() + ".")
        p.add_argument("--tenant", help="the tenant (omit with --scope shared)")
        p.add_argument("--scope", default="tenant", choices=("tenant", "shared"))
        if name in ("show", "activate"):
            p.add_argument("version", type=int)
        p.set_defaults(func=command(globals()[f"_adapters_{name}"]))
    e = asub.add_parser(
        "export", parents=[db], help="write a version as a GGUF LoRA file for llama.cpp",
        description="Write a tenant's active (or --version) adapter as a GGUF LoRA file that "
        "llama.cpp loads (llama-cli / llama-server --lora FILE, llama-cpp-python, Ollama's "
        "ADAPTER) on the default model's GGUF. Each adapter is exported alone; to serve a tenant "
        "the way onthejob does, export the shared adapter too (--scope shared) and stack both: "
        "--lora shared.gguf --lora tenant.gguf.")
    e.add_argument("--tenant", help="the tenant (omit with --scope shared)")
    e.add_argument("--scope", default="tenant", choices=("tenant", "shared"))
    e.add_argument("--version", type=int, help="the version to export (default: the active one)")
    e.add_argument("--format", default="gguf", choices=("gguf",),
                   help="file format (default %(default)s)")
    e.add_argument("--out", metavar="FILE",
                   help="output file (default: TENANT-vVERSION.gguf in the current folder)")
    e.add_argument("--base", metavar="GGUF",
                   help="the GGUF model the adapter will run on, for its architecture, head "
                   "counts and shapes (default: the embedded default model's)")
    e.set_defaults(func=command(_adapters_export))

    d = sub.add_parser("demo", help="the whole loop on the default model, end to end",
                       description="A session teaches the model a fact it does not know; the "
                       "user approves it; consolidation runs; a new session without the old one "
                       "answers. Its store and adapters go to a new folder under "
                       "$ONTHEJOB_HOME/demos/ (printed at the start and the end), or, with "
                       "--keep, into ONTHEJOB_HOME's own store beside your tenants.")
    d.add_argument("--steps", type=int, default=None,
                   help="training steps (default: what --visits asks for)")
    d.add_argument("--visits", type=float, default=VISITS,
                   help="the budget: visits per training probe (default %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="training seed (default %(default)s)")
    add_lora_options(d)
    add_practice_option(d)
    add_opsd_options(d)
    d.add_argument("--keep", action="store_true",
                   help="use ONTHEJOB_HOME's own store and adapters, not a demo folder")
    d.add_argument("--model", help="local HF model directory (default: embedded)")
    d.set_defaults(func=_demo)


def add_lora_options(p: argparse.ArgumentParser) -> None:
    """The update: learning rate and optimizer; the adapter's shape: rank and which layers it
    touches."""
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default %(default)s)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw moves every adapter weight about lr a step; sgd (momentum 0.9) "
                   "moves each in proportion to its gradient, so it wants a larger --lr "
                   "(default %(default)s)")
    add_lr_schedule_option(p)
    p.add_argument("--rank", type=_positive, default=16, help="LoRA rank; alpha is twice the rank "
                   "(default %(default)s)")
    p.add_argument("--lora-modules", default="all", choices=sorted(LORA_MODULES),
                   help="the layers the adapter touches: all linear layers, attention only or "
                   "the MLP only (default %(default)s)")


def add_lr_schedule_option(p: argparse.ArgumentParser) -> None:
    """--lr-schedule: the learning rate over the run (learn/loop.py lr_factor)."""
    p.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,
                   help="constant: --lr every step; cosine: a short warmup, then a decay to a "
                   "tenth of --lr by the last step (default %(default)s)")


def _at_least(low: int):
    """An argparse type: an integer of at least `low`."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value
    parse.__name__ = "int"  # argparse says "invalid int value: 'x'" for a non-number
    return parse


_count, _positive = _at_least(0), _at_least(1)


def lora_spec(args: argparse.Namespace) -> LoraSpec:
    return LoraSpec(rank=args.rank, alpha=2 * args.rank, targets=LORA_MODULES[args.lora_modules])


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown practice kinds {unknown or [text]}; give a "
                                         f"comma-separated list of {', '.join(KINDS)}")
    return kinds


def add_practice_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--practice", type=_kinds, default=KINDS, metavar="KINDS",
                   help="the kinds of practice prompts written from each session, comma-separated: "
                   "rule (a question per answer span, by rule), span (the model's own question "
                   "for a span), question (model-written questions), topic ('what do you know "
                   "about X'), replay (the session's own user turns) (default: all)")
    p.add_argument("--span-phrasings", type=_positive, default=SPAN_PHRASINGS, metavar="N",
                   help="the model's own questions per answer span (the span kind): its greedy "
                   "one, then N-1 sampled, each checked against the span (default %(default)s)")
    p.add_argument("--bare-phrases", type=_count, default=BARE_PHRASES, metavar="N",
                   help="noun phrases asked (rule and span kinds) of a sentence that names no "
                   "name or number, which otherwise gives no prompt: explanatory text; only "
                   "in what the user or a tool supplied (default %(default)s)")


def add_opsd_options(p: argparse.ArgumentParser) -> None:
    """OPSD's knobs, with consolidation's recipe as the defaults (one place for every command)."""
    rec = recommended_opsd()
    p.add_argument("--divergence", default=rec.divergence, choices=DIVERGENCES,
                   help="OPSD's per-token divergence (default %(default)s)")
    p.add_argument("--teacher-mix", type=float, default=rec.teacher_mix,
                   help="share of OPSD rows that are the teacher's stored answers (1 = teacher "
                   "rows only; 0 = on-policy only: the student samples, the teacher scores; "
                   "default %(default)s)")
    p.add_argument("--on-policy-from", type=float, default=rec.on_policy_from,
                   help="after this share of the steps every row is on-policy (0.5 with "
                   "--teacher-mix 1: teacher rows, then on-policy; default %(default)s)")
    p.add_argument("--teacher-samples", type=int, default=rec.teacher_samples,
                   help="teacher samples per probe beside its greedy answer (default %(default)s)")
    p.add_argument("--anchor-share", type=float, default=rec.anchor_share,
                   help="share of OPSD rows that are ordinary anchors (default %(default)s)")
    p.add_argument("--anchor-weight", type=float, default=rec.anchor_weight,
                   help="weight of the anchor rows' mean loss beside the lesson rows' (a larger "
                   "one holds the model nearer the base on ordinary prompts; default %(default)s)")
    p.add_argument("--self-anchors", type=_count, default=rec.self_anchors, metavar="N",
                   help="also hold N prompts the base model writes itself as a user would to "
                   "its own answers, beside the 64 fixed anchors; none resembles a general "
                   "question or names a session fact (default %(default)s: the fixed ones only)")
    p.add_argument("--review-prompts", type=_count, default=rec.review_prompts, metavar="N",
                   help="also teach each review's words as an instruction: N ordinary prompts "
                   "the base model writes, answered by the teacher that reads only the review "
                   "in its system prompt (default %(default)s: the review is read after the "
                   "session only)")
    p.add_argument("--anchor-target", default=rec.anchor_target, choices=ANCHOR_TARGETS,
                   help="what anchors are held to: the base model (no drift compounds over "
                   "versions), the model before the run (prior) or the teacher "
                   "(default %(default)s)")
    p.add_argument("--teacher-from", default=rec.teacher_from, choices=TEACHER_FROM,
                   help="who reads the session as the teacher: the parent version (its "
                   "adapters) or the base model, so that a parent's drift does not pass into "
                   "the next version's targets (default %(default)s)")
    p.add_argument("--label-weight", type=float, default=rec.label_weight,
                   help="add this weight x the cross-entropy on the teacher's stored answer "
                   "tokens to the divergence on lesson rows (0: the divergence alone; "
                   "default %(default)s)")
    p.add_argument("--prompts-per-step", type=int, default=rec.prompts_per_step,
                   help="OPSD rows per step (default %(default)s)")
    p.add_argument("--sample-tokens", type=int, default=rec.max_new_tokens,
                   help="length of each on-policy sample (default %(default)s)")
    p.add_argument("--top-k", type=int, default=rec.top_k,
                   help="teacher log-probs kept per token (default %(default)s)")
    p.add_argument("--informative-only", action=argparse.BooleanOptionalAction,
                   default=rec.informative_only,
                   help="keep the teacher's answers to open practice prompts (no known span) only "
                   "where they name a fact of the session the prompt does not, and do not loop "
                   "(default %(default)s)")
    p.add_argument("--rescore-kept", action="store_true",
                   help="score the session's own answers again instead of taking their rows "
                   "from the log-probs the server kept (to measure what the reuse saves)")


def add_gate_options(p: argparse.ArgumentParser) -> None:
    """The promotion gate's thresholds (one place for every command that promotes)."""
    g = p.add_argument_group("promotion gate", "a candidate adapter becomes active only if "
                             "every check passes (each bound inclusive)")
    g.add_argument("--min-gain", type=float, default=GateConfig.min_gain,
                   help="learned: held-back probe F1 without context must gain at least this "
                   "over the parent")
    g.add_argument("--max-kl", type=float, default=GateConfig.max_kl,
                   help="forgot: KL to the base on anchor prompts at most this")
    g.add_argument("--max-retention-drop", type=float, default=GateConfig.max_retention_drop,
                   help="forgot: in-context reading accuracy may drop at most this")
    g.add_argument("--max-earlier-drop", type=float, default=GateConfig.max_earlier_drop,
                   help="forgot: earlier sessions' held-back probe F1 may drop at most this")
    g.add_argument("--max-general-drop", type=float, default=GateConfig.max_general_drop,
                   help="forgot: accuracy on the 79 stable general questions may drop at most this")


def gate_options(args: argparse.Namespace) -> GateConfig:
    return GateConfig(min_gain=args.min_gain, max_kl=args.max_kl,
                      max_retention_drop=args.max_retention_drop,
                      max_earlier_drop=args.max_earlier_drop,
                      max_general_drop=args.max_general_drop)


def opsd_options(args: argparse.Namespace) -> OpsdConfig:
    return OpsdConfig(divergence=args.divergence, teacher_mix=args.teacher_mix,
                      on_policy_from=args.on_policy_from, teacher_samples=args.teacher_samples,
                      anchor_share=args.anchor_share, anchor_weight=args.anchor_weight,
                      anchor_target=args.anchor_target,
                      self_anchors=args.self_anchors, review_prompts=args.review_prompts,
                      teacher_from=args.teacher_from,
                      prompts_per_step=args.prompts_per_step, max_new_tokens=args.sample_tokens,
                      top_k=args.top_k, reuse_kept=not getattr(args, "rescore_kept", False),
                      informative_only=args.informative_only, label_weight=args.label_weight)


def _options(args: argparse.Namespace) -> ConsolidateOptions:
    return ConsolidateOptions(
        method=args.method, scope=args.scope, session_ids=args.sessions, dry_run=args.dry_run,
        train=TrainConfig(steps=args.steps or 100, lr=args.lr, seed=args.seed,
                          lora=lora_spec(args), optimizer=args.optimizer,
                          lr_schedule=args.lr_schedule),
        visits=None if args.steps else args.visits, probe_kinds=args.practice,
        span_phrasings=args.span_phrasings, bare_phrases=args.bare_phrases,
        opsd=opsd_options(args), gate=gate_options(args))


def _consolidate(args: argparse.Namespace) -> int:
    from onthejob.model import load_model

    try:
        store = Store(args.db)
    except Exception as exc:  # noqa: BLE001 - a connection problem, said plainly
        print(f"error: cannot open the database: {exc}", file=sys.stderr)
        return 1
    try:
        lm = load_model(args.model)
        outcome = consolidate(store, lm, args.tenant, _options(args), say=stamped)
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(outcome.message)
    return 0 if outcome.status in ("promoted", "planned", "nothing") else 3


def stamped(line: str) -> None:
    """A line for a job runner's log: the time first, written at once."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


def _owner(args) -> str | None:
    if args.scope == "tenant" and not args.tenant:
        raise ValueError("--tenant is required (or --scope shared)")
    return args.tenant if args.scope == "tenant" else None


def _adapters_list(store: Store, args) -> int:
    rows = store.list_adapters(args.scope, _owner(args))
    if not rows:
        print("no adapters yet: run `onthejob consolidate`")
    for a in rows:
        m = a.metrics
        print(f"v{a.version:<3} {a.status:<9} {a.method:<5} parent={a.parent_id or '-':<4} "
              f"gain={m.get('gain', 0):+.3f} kl={m.get('kl_to_base', 0):.3f} "
              f"{a.created_at:%Y-%m-%d %H:%M}  {a.reason}")
    return 0


def _find(store: Store, args):
    for a in store.list_adapters(args.scope, _owner(args)):
        if a.version == args.version:
            return a
    raise ValueError(f"no version {args.version}; see `onthejob adapters list`")


def _adapters_show(store: Store, args) -> int:
    print(json.dumps(plain(_find(store, args)), indent=2, default=str))
    return 0


def _adapters_activate(store: Store, args) -> int:
    from onthejob.learn.activation import activate_checked
    from onthejob.model.adapters import AdapterError

    adapter = _find(store, args)
    try:
        activate_checked(store, adapter)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"v{adapter.version} is active")
    return 0


def _adapters_rollback(store: Store, args) -> int:
    restored = store.rollback_adapter(_owner(args), args.scope)
    print(f"v{restored.version} is active" if restored else "no adapter is active: the base model serves")
    return 0


def _adapters_export(store: Store, args) -> int:
    from onthejob.model.adapters import AdapterError
    from onthejob.model.gguf_lora import base_model, export_gguf, shipped_gguf

    owner = _owner(args)
    if args.version is None:
        adapter = store.active_adapter(owner, args.scope)
        if adapter is None:
            who = f"tenant {owner}" if owner else "the shared scope"
            raise ValueError(f"{who} has no active adapter: pass --version N "
                             "(see `onthejob adapters list`)")
    else:
        adapter = _find(store, args)
    out = args.out or f"{owner or 'shared'}-v{adapter.version}.gguf"
    try:
        base_file = args.base or shipped_gguf()
        info = export_gguf(adapter.path, out, base_model(base_file))
    except AdapterError as exc:
        print(f"error: cannot export v{adapter.version} ({adapter.path}): {exc}", file=sys.stderr)
        return 1
    print(f"wrote {info.path}: v{adapter.version}, LoRA rank {info.rank}, alpha {info.alpha:g}, "
          f"{info.tensors // 2} matrices")
    if info.folded:
        print(f"  scale folded into B for {len(info.folded)} modules (rsLoRA or alpha_pattern)")
    print(f"use: llama-cli -m {base_file} --lora {info.path}")
    if (args.scope == "tenant" and store.get_tenant(owner).allow_shared
            and store.active_adapter(None, "shared") is not None):
        print("onthejob serves this tenant with the shared adapter too: export it with "
              "`onthejob adapters export --scope shared` and add a second --lora")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from onthejob.recipes.demo import Demo, run_demo

    budget = TrainConfig(steps=args.steps or 100, lr=args.lr, seed=args.seed, lora=lora_spec(args),
                         optimizer=args.optimizer, lr_schedule=args.lr_schedule)
    return run_demo(Demo(train=budget, visits=None if args.steps else args.visits,
                         opsd=opsd_options(args), keep=args.keep, model=args.model,
                         divergence=args.divergence, practice=args.practice,
                         span_phrasings=args.span_phrasings, bare_phrases=args.bare_phrases))
