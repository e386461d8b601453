"""`onthejob grind`: train a LoRA adapter with GRPO in a grindable environment.

Writes to --out (default $ONTHEJOB_HOME/runs/<run id>/): curve.json (config, every step's
metrics, the held-out evaluation before and after), curve.png (the reward curve), and the
adapter (`adapter/`) unless --tenant is given: then the adapter goes to the adapter store
as the tenant's next version, registered as a candidate with its metrics.

With --warmup-steps N, GRPO starts from a supervised warm-up: N steps of imitation of the
env's scripted policy (learn/warmup.py) on seeds of their own, optionally on other start
pages (--warmup-option) and without the decisions on some pages (--warmup-skip-page). The
held-out reward is measured before the warm-up, after it, and after GRPO, so what GRPO added
is told apart from what the warm-up gave. The warm-up adapter is kept in OUT/warmup-adapter.

A killed grind is resumed, as a killed consolidation is: every step writes a checkpoint
(OUT/checkpoint, the warm-up's OUT/warmup-checkpoint). With --tenant, the next grind of the
same work (same env, options and settings) marks the dead run interrupted and goes on from
its checkpoint in its folder; without, a grind whose --out holds an unfinished run of the
same work goes on from it. Adapter files a killed run wrote but never registered are set
aside (`vN.unregistered-<time>`), so they never block the next save.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from onthejob.envs.base import EnvError
from onthejob.envs.model_policy import SYSTEM
from onthejob.learn.grpo import GrpoConfig, eval_seeds

# The action language, told to the model for environments whose actions are not free text.
SYSTEMS = {
    "shop": "You are shopping on a web site. Reply with exactly one action and nothing else: "
            "search QUERY | click ID | type FIELD TEXT | select FIELD VALUE. The IDs are the id "
            "attributes on the page, e.g. click p07, click add-to-cart, click checkout, "
            "click continue, click place-order.",
}


def register(sub: argparse._SubParsersAction) -> None:
    from onthejob.store.cli import _db_option

    g = sub.add_parser(
        "grind", parents=[_db_option()], help="train an adapter with GRPO in an environment",
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


def _warmup_examples(args: argparse.Namespace, cfg: GrpoConfig) -> list | None:
    """The scripted decisions the warm-up imitates (None without a warm-up)."""
    from onthejob.envs.registry import parse_options
    from onthejob.learn.warmup import check_skip_pages, scripted_examples, warmup_seeds

    if args.warmup_steps < 0 or args.warmup_batch < 1 or args.warmup_episodes < 0:
        raise ValueError("--warmup-steps, --warmup-episodes and --warmup-batch must not be "
                         "negative (--warmup-batch at least 1)")
    if not args.warmup_steps:
        return None
    check_skip_pages(cfg.env, args.warmup_skip_page)
    options = cfg.options if args.warmup_option is None else parse_options(args.warmup_option)
    examples = scripted_examples(cfg.env, options, warmup_seeds(args.warmup_episodes),
                                 skip_pages=args.warmup_skip_page)
    if not examples:
        raise ValueError("the warm-up has nothing to imitate: no solved scripted episode, or "
                         "every decision is on a skipped page (raise --warmup-episodes)")
    args.warmup_options = options
    return examples


def _grind(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
        from onthejob.learn.grpo import Grpo

        rule = Grpo(cfg)
        args.examples = _warmup_examples(args, cfg)
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
    return run_grind(args, cfg, rule, store)


def run_grind(args: argparse.Namespace, cfg: GrpoConfig, rule, store) -> int:
    from onthejob import config, faults
    from onthejob.learn.grpo import evaluate
    from onthejob.learn.loop import STUDENT, TrainConfig, Trainer, config_dict, print_progress
    from onthejob.model import load_model
    from onthejob.model.adapters import LoraSpec, save

    started = time.time()
    train = TrainConfig(steps=args.steps, lr=args.lr, seed=args.seed,
                        lora=LoraSpec(rank=args.rank, alpha=2 * args.rank))
    params = {"env": cfg.env, "options": cfg.options, "train": config_dict(train),
              "grpo": _plain_cfg(cfg), "warmup": _warmup_params(args)}
    resumed = None
    if store:
        for dead in store.interrupt_dead_runs():
            print(f"run {dead.id} ({dead.kind}) had stopped mid-way; marked interrupted",
                  file=sys.stderr, flush=True)
        resumed = _resumable(store, args.tenant, params)
    if resumed is not None:  # its folder and rollout log go on
        rule.run_id, out = resumed.params["run_id"], Path(resumed.params["out"])
    else:
        out = Path(args.out) if args.out else config.home() / "runs" / rule.run_id
    out.mkdir(parents=True, exist_ok=True)
    carried = _unfinished(out, params)
    if resumed is None and carried is not None:
        rule.run_id = carried["run_id"]
    if resumed is not None or carried is not None:
        print(f"resuming the unfinished grind in {out}"
              + (f" (interrupted run {resumed.id})" if resumed else ""), file=sys.stderr,
              flush=True)
    plot = Path(args.plot) if args.plot else out / "curve.png"
    lm = load_model(args.model)
    seeds = eval_seeds(args.eval_seeds)

    def held_out() -> dict | None:
        if not seeds:
            return None
        t = time.time()
        result = evaluate(lm, cfg.env, cfg.options, seeds, cfg.max_turns, cfg.max_new_tokens,
                          temperature=args.eval_temperature, system=cfg.system,
                          solved_at=cfg.solved_at)
        result["seconds"] = time.time() - t
        return result

    print(f"grind {cfg.env} {cfg.options}: {args.steps} steps x {cfg.starts} groups x "
          f"{cfg.group} rollouts, lr {args.lr}, run {rule.run_id}", file=sys.stderr, flush=True)
    before = carried["eval_before"] if carried is not None else held_out()
    if before and carried is None:
        print(f"held-out before: reward {before['reward']:.3f} solved {before['solved']:.3f} "
              f"on {len(seeds)} seeds ({before['seconds']:.0f} s)", file=sys.stderr, flush=True)
    run_row = store.create_run("grind", args.tenant, params={
        **params, "run_id": rule.run_id, "out": str(out),
        "resumed_from": resumed.id if resumed else None}) if store else None
    if resumed is not None:
        store.update_run(resumed.id, progress={"resumed_by": run_row.id})
    record = {"command": "onthejob " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
              "run_id": rule.run_id, "env": cfg.env, "options": cfg.options,
              "grpo": _plain_cfg(cfg), "train": config_dict(train), "params": params,
              "eval_before": before}
    if carried is not None and carried.get("warmup"):
        record["warmup"] = carried["warmup"]
    _write(out / "curve.json", record)  # what a resume checks its work against
    examples = getattr(args, "examples", None)
    parent = None
    if record.get("warmup") and (out / "warmup-adapter").exists():
        parent = out / "warmup-adapter"  # the warm-up finished before the kill
    elif examples:
        try:
            parent, record["warmup"] = _warm_up(args, cfg, lm, train, examples, out, held_out)
        except BaseException as exc:
            if store:
                store.update_run(run_row.id, status="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        _write(out / "curve.json", record)
    trainer = Trainer(lm, train, parent=parent)
    show = print_progress(f"[grpo {cfg.env}] ")

    def progress(m: dict) -> None:
        show(m)
        record["history"] = trainer.history
        _write(out / "curve.json", record)
        if store:
            store.update_run(run_row.id, progress={k: v for k, v in m.items()
                                                   if isinstance(v, (int, float)) and math.isfinite(v)})

    try:
        trainer.run(rule, progress=progress, checkpoint=out / "checkpoint")
    except BaseException as exc:
        if store:
            store.update_run(run_row.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    with trainer.frozen_student():
        after = held_out()
    if after:
        print(f"held-out after: reward {after['reward']:.3f} solved {after['solved']:.3f}",
              file=sys.stderr, flush=True)
    history = trainer.history
    k = max(1, len(history) // 4)
    warmed = (record.get("warmup") or {}).get("eval")
    summary = {"reward_first": _mean([h["reward"] for h in history[:k]]),
               "reward_last": _mean([h["reward"] for h in history[-k:]]),
               "window": k, "steps": len(history), "seconds": time.time() - started,
               "rollouts": rule.rollouts, "faults": rule.faults, "tokens": rule.tokens_trained,
               "eval_before": before, "eval_after_warmup": warmed, "eval_after": after}
    metrics = {"env": cfg.env, "options": cfg.options, "run_id": rule.run_id, **summary,
               "gain": (after["reward"] - before["reward"]) if before and after else None,
               "gain_grpo": (after["reward"] - warmed["reward"]) if warmed and after else None,
               "kl_to_base": _last_finite(history, "kl")}
    meta = {"method": "grpo", "env": cfg.env, "options": cfg.options, "run": rule.run_id}
    if store:
        version = store.next_adapter_version("tenant", args.tenant)
        where = config.adapters_dir() / "tenant" / args.tenant / f"v{version}"
        set_aside(where, "unregistered")  # written by a killed run, never registered
        digest = save(lm.model, STUDENT, where, meta=meta)
        faults.point("adapter-saved")
        adapter = store.add_adapter("tenant", args.tenant, method="grpo", path=str(where),
                                    checksum=digest, version=version, metrics=metrics,
                                    status="candidate", reason=f"grpo on {cfg.env}")
        faults.point("candidate-registered")
        store.update_run(run_row.id, status="done", progress={"adapter": adapter.id})
        where_text = f"candidate v{version} of tenant {args.tenant} ({where})"
    else:
        where = out / "adapter"
        set_aside(where, "previous")  # an earlier grind's result in the same folder
        save(lm.model, STUDENT, where, meta=meta)
        faults.point("adapter-saved")
        where_text = str(where)
    record.update(history=history, eval_after=after, summary=summary, adapter=str(where))
    _write(out / "curve.json", record)
    write_plot(record, plot)
    print(f"reward {summary['reward_first']:.3f} (first {k} steps) -> "
          f"{summary['reward_last']:.3f} (last {k}); adapter: {where_text}; "
          f"curve: {out / 'curve.json'}, {plot}; {summary['seconds']:.0f} s")
    return 0


def _warmup_params(args: argparse.Namespace) -> dict | None:
    """The warm-up's settings, part of what makes two grinds the same work."""
    if not getattr(args, "warmup_steps", 0):
        return None
    return {"steps": args.warmup_steps, "episodes": args.warmup_episodes,
            "options": args.warmup_option, "skip_pages": list(args.warmup_skip_page),
            "lr": args.warmup_lr, "batch": args.warmup_batch}


def _resumable(store, tenant: str, params: dict):
    """The latest interrupted grind of the same work, not taken over, whose folder still
    holds its checkpoint."""
    wanted = json.loads(json.dumps(params, default=str))  # as stored: tuples become lists
    for run in store.list_runs("grind", tenant, status="interrupted", limit=10):
        same = {k: v for k, v in run.params.items()
                if k not in ("process", "resumed_from", "run_id", "out")}
        if (same == wanted and not run.progress.get("resumed_by") and run.params.get("out")
                and (Path(run.params["out"]) / "checkpoint" / "state.pt").exists()):
            return run
    return None


def _unfinished(out: Path, params: dict) -> dict | None:
    """The record of a grind of the same work in `out` that did not finish, if any."""
    try:
        record = json.loads((out / "curve.json").read_text())
    except (OSError, ValueError):
        return None
    wanted = json.loads(json.dumps(params, default=str))
    if record.get("params") != wanted or "summary" in record:
        return None
    return record


def set_aside(path: Path, why: str) -> Path | None:
    """Rename an existing adapter folder out of the way (`NAME.WHY-<time>`); None if absent."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, target)
    print(f"set aside {path} as {target.name}", file=sys.stderr, flush=True)
    return target


def _warm_up(args: argparse.Namespace, cfg: GrpoConfig, lm, train, examples: list, out: Path,
             held_out) -> tuple[Path, dict]:
    """Imitation steps on the scripted decisions, on their own trainer; the adapter is saved
    to OUT/warmup-adapter and GRPO's student starts as a copy of it. Returns that path and
    the warm-up's record (settings, examples, per-step history, held-out after it)."""
    from collections import Counter
    from dataclasses import replace

    from onthejob.learn.loop import STUDENT, Trainer, print_progress
    from onthejob.learn.warmup import Imitation, encode_examples
    from onthejob.model.adapters import detach, save
    from onthejob.model.chat import end_of_turn_ids

    started = time.time()
    eot = min(end_of_turn_ids(lm.tokenizer) - {None}, default=None)
    pairs = encode_examples(lm, examples, cfg.system, eot)
    pages = Counter(e.page for e in examples if e.page)
    verbs = Counter(" ".join(e.action.split()[:2]) for e in examples)
    lr = args.warmup_lr if args.warmup_lr is not None else args.lr
    print(f"warm-up: imitate {len(examples)} scripted decisions from {args.warmup_episodes} "
          f"episodes of {cfg.env} {args.warmup_options} (seeds {examples[0].seed}..), "
          f"{args.warmup_steps} steps x {args.warmup_batch}, lr {lr}"
          + (f"; pages left out: {', '.join(args.warmup_skip_page)}" if args.warmup_skip_page
             else ""), file=sys.stderr, flush=True)
    warm = Trainer(lm, replace(train, steps=args.warmup_steps, lr=lr))
    warm.run(Imitation(pairs, batch_size=args.warmup_batch),
             progress=print_progress(f"[warm-up {cfg.env}] "), checkpoint=out / "warmup-checkpoint")
    where = out / "warmup-adapter"
    set_aside(where, "previous")
    save(lm.model, STUDENT, where, meta={"method": "imitation", "env": cfg.env,
                                         "options": args.warmup_options})
    seconds = time.time() - started
    with warm.frozen_student():
        evaluation = held_out()
    detach(lm, STUDENT)  # GRPO's trainer attaches its student as a copy of the saved one
    if evaluation:
        print(f"held-out after warm-up: reward {evaluation['reward']:.3f} solved "
              f"{evaluation['solved']:.3f} (warm-up {seconds:.0f} s)", file=sys.stderr, flush=True)
    return where, {
        "steps": args.warmup_steps, "batch": args.warmup_batch, "lr": lr,
        "episodes": args.warmup_episodes, "options": args.warmup_options,
        "skip_pages": list(args.warmup_skip_page), "seeds": [examples[0].seed, examples[-1].seed],
        "decisions": len(examples), "pages": dict(pages), "actions": dict(verbs.most_common(20)),
        "history": warm.history, "seconds": seconds, "eval": evaluation,
        "adapter": str(where)}


def _plain_cfg(cfg: GrpoConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, float) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _last_finite(history: list[dict], key: str) -> float | None:
    for h in reversed(history):
        v = h.get(key)
        if isinstance(v, float) and math.isfinite(v):
            return v
    return None


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str, allow_nan=True))
    tmp.replace(path)


def write_plot(record: dict, path: str | Path) -> None:
    """Per-step mean reward, its moving average, and the held-out reward before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = record.get("history") or []
    steps = [h["step"] for h in history]
    reward = [h["reward"] for h in history]
    w = max(1, len(reward) // 8)
    smooth = [_mean(reward[max(0, i - w + 1): i + 1]) for i in range(len(reward))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, ".", alpha=0.4, label="mean reward of the step's rollouts")
    ax.plot(steps, smooth, "-", label=f"moving average ({w} steps)")
    lines = [("--", "gray", "held-out before", record.get("eval_before")),
             ("-.", "tab:green", "held-out after warm-up (GRPO's start)",
              (record.get("warmup") or {}).get("eval")),
             (":", "black", "held-out after GRPO", record.get("eval_after"))]
    for style, color, name, result in lines:
        if result:
            ax.axhline(result["reward"], linestyle=style, color=color,
                       label=f"{name}: {result['reward']:.2f}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"onthejob grind {record.get('env')} {record.get('options') or ''}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
