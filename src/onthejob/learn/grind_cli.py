"""`onthejob grind`: parses its arguments and calls the grind recipe (recipes/grind.py: GRPO
in a grindable environment, with an optional supervised warm-up; what it writes, and how a
killed grind resumes, is told there)."""

from __future__ import annotations

import argparse
import sys

from onthejob.envs.base import EnvError
from onthejob.envs.model_policy import SYSTEM
from onthejob.learn.grpo import GrpoConfig
from onthejob.recipes.grind import SYSTEMS, Grind, Warmup, run_grind, warmup_examples


def register(sub: argparse._SubParsersAction) -> None:
    from onthejob.store.cli import db_option

    g = sub.add_parser(
        "grind", parents=[db_option()], help="train an adapter with GRPO in an environment",
        description="RLVR: sample groups of rollouts of the model in an environment, reward them "
        "with its checker, and train a LoRA adapter with GRPO (group-relative advantages, "
        "clipped ratio, optional KL to the base). Prints progress with ETA; writes the reward "
        "curve (JSON and PNG) and the adapter; with --tenant the adapter is registered as a "
        "candidate version of that tenant. Every rollout is logged (`onthejob replay RUN_ID`).")
    g.add_argument("--env", default="arith", help="environment name (see `onthejob envs list`)")
    g.add_argument("--group", type=int, default=8, help="rollouts per start state (G)")
    g.add_argument("--starts", type=int, default=2, help="start states (groups) per step")
    g.add_argument("--steps", type=int, default=20, help="GRPO steps (one batch of groups each)")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--rank", type=int, default=16, help="LoRA rank")
    g.add_argument("--difficulty", type=int, help="shortcut for --option difficulty=N (arith)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment option, e.g. start=review for shop (repeatable; JSON values)")
    g.add_argument("--max-turns", type=int, default=None,
                   help="environment steps per episode at most (default: 1 for arith, 6 otherwise)")
    g.add_argument("--max-new-tokens", type=int, default=16, help="tokens per reply")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--clip-eps", type=float, default=0.2)
    g.add_argument("--clip-eps-high", type=float, default=None,
                   help="upper clip (default: --clip-eps)")
    g.add_argument("--beta", type=float, default=0.0, help="weight of the k3 KL to the base")
    g.add_argument("--kl-every", type=int, default=1,
                   help="with --beta 0, measure the KL to the base every k steps (0: never)")
    g.add_argument("--epochs", type=int, default=1, help="inner updates per batch of rollouts")
    g.add_argument("--no-std", action="store_true", help="advantages r - mean, not divided by std")
    g.add_argument("--agg", default="token", choices=("token", "rollout"),
                   help="average the loss over all tokens, or per rollout first")
    g.add_argument("--system", default=None,
                   help="system prompt of the policy (default: one per environment)")
    w = g.add_argument_group(
        "supervised warm-up", "before GRPO, imitate the env's scripted policy for a few steps, "
        "so that a base model that never earns a reward (every group flat) gets a non-zero "
        "rate to start from; the held-out reward is measured after the warm-up too")
    w.add_argument("--warmup-steps", type=int, default=0,
                   help="imitation steps before GRPO (0: no warm-up)")
    w.add_argument("--warmup-episodes", type=int, default=32,
                   help="scripted episodes to imitate, on seeds 5,000,000 up (disjoint from "
                   "GRPO's training seeds and from the held-out seeds)")
    w.add_argument("--warmup-option", action="append", default=None, metavar="KEY=VALUE",
                   help="environment option of the warm-up episodes (repeatable; when given, "
                   "replaces --option for them), e.g. start=home to imitate whole checkouts")
    w.add_argument("--warmup-skip-page", action="append", default=[], metavar="PAGE",
                   help="(shop) leave the decisions taken on this page out of the warm-up "
                   "(repeatable), e.g. review: the model never sees `click place-order` done")
    w.add_argument("--warmup-lr", type=float, default=None, help="warm-up learning rate "
                   "(default: --lr)")
    w.add_argument("--warmup-batch", type=int, default=4, help="decisions per warm-up step")
    g.add_argument("--eval-seeds", type=int, default=64,
                   help="held-out seeds evaluated before and after (0: skip)")
    g.add_argument("--eval-temperature", type=float, default=0.0,
                   help="temperature of the held-out evaluation (0: greedy)")
    g.add_argument("--backend", default="inline", choices=("inline", "process", "ray"),
                   help="where environment steps run")
    g.add_argument("--no-log", action="store_true", help="do not log the rollouts")
    g.add_argument("--tenant", help="register the adapter as a candidate version of this tenant")
    g.add_argument("--out", help="output folder (default: $ONTHEJOB_HOME/runs/<run id>)")
    g.add_argument("--plot", help="PNG of the reward curve (default: OUT/curve.png)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model", help="local HF model directory (default: embedded)")
    g.set_defaults(func=_grind)


def _config(args: argparse.Namespace) -> GrpoConfig:
    from onthejob.envs.registry import parse_options

    options = parse_options(args.option)
    if args.difficulty is not None:
        options["difficulty"] = args.difficulty
    max_turns = args.max_turns or (1 if args.env == "arith" else 6)
    return GrpoConfig(
        env=args.env, options=options, group=args.group, starts=args.starts,
        max_turns=max_turns, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        system=args.system if args.system is not None else SYSTEMS.get(args.env, SYSTEM),
        clip_eps=args.clip_eps, clip_eps_high=args.clip_eps_high, beta=args.beta,
        kl_every=args.kl_every, scale_std=not args.no_std, epochs=args.epochs, agg=args.agg,
        backend=args.backend, log_rollouts=not args.no_log)


def _grind(args: argparse.Namespace) -> int:
    grind = Grind(steps=args.steps, lr=args.lr, rank=args.rank, seed=args.seed,
                  eval_seeds=args.eval_seeds, eval_temperature=args.eval_temperature,
                  tenant=args.tenant, out=args.out, plot=args.plot, model=args.model,
                  command="onthejob " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
                  warmup=Warmup(steps=args.warmup_steps, episodes=args.warmup_episodes,
                                options=args.warmup_option, skip_pages=args.warmup_skip_page,
                                lr=args.warmup_lr, batch=args.warmup_batch))
    try:
        cfg = _config(args)
        from onthejob.learn.grpo import Grpo

        rule = Grpo(cfg)
        imitate = warmup_examples(grind.warmup, cfg)
    except (EnvError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = None
    if args.tenant:
        from onthejob.store import Store, StoreError

        try:
            store = Store(args.db)
            store.get_tenant(args.tenant)
        except StoreError as exc:
            print(f"error: {exc} (create it with `onthejob tenants add {args.tenant}`)",
                  file=sys.stderr)
            return 1
    run_grind(grind, cfg, rule, store, imitate)
    return 0
