"""The grind recipe: train a LoRA adapter with GRPO in a grindable environment.

Writes to `Grind.out` (default $ONTHEJOB_HOME/runs/<run id>/): curve.json (config, every
step's metrics, the held-out evaluation before and after), curve.png (the reward curve), and
the adapter (`adapter/`) unless a tenant is given: then the adapter goes to the adapter store
as the tenant's next version, registered as a candidate with its metrics.

With `Warmup.steps` N, GRPO starts from a supervised warm-up: N steps of imitation of the
env's scripted policy (learn/warmup.py) on seeds of their own, optionally on other start
pages (`Warmup.options`) and without the decisions on some pages (`Warmup.skip_pages`). The
held-out reward is measured before the warm-up, after it, and after GRPO, so what GRPO added
is told apart from what the warm-up gave. The warm-up adapter is kept in OUT/warmup-adapter.

A killed grind is resumed, as a killed consolidation is: every step writes a checkpoint
(OUT/checkpoint, the warm-up's OUT/warmup-checkpoint). With a tenant, the next grind of the
same work (same env, options and settings) marks the dead run interrupted and goes on from
its checkpoint in its folder; without, a grind whose out folder holds an unfinished run of
the same work goes on from it. Adapter files a killed run wrote but never registered are set
aside (`vN.unregistered-<time>`), so they never block the next save.

`onthejob grind` (learn/grind_cli.py) parses its arguments into a `Grind` and calls
`run_grind`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from onthejob.envs.held_out import eval_seeds
from onthejob.learn.grpo import GrpoConfig

# The action language, told to the model for environments whose actions are not free text.
SYSTEMS = {
    "shop": "You are shopping on a web site. Reply with exactly one action and nothing else: "
            "search QUERY | click ID | type FIELD TEXT | select FIELD VALUE. The IDs are the id "
            "attributes on the page, e.g. click p07, click add-to-cart, click checkout, "
            "click continue, click place-order.",
}


@dataclass
class Warmup:
    """The supervised warm-up before GRPO: imitation of the env's scripted policy."""

    steps: int = 0  # imitation steps (0: no warm-up)
    episodes: int = 32  # scripted episodes to imitate, on seeds of their own
    options: list[str] | None = None  # KEY=VALUE env options, as given; None: the grind's own
    skip_pages: list[str] = field(default_factory=list)  # (shop) pages whose decisions are left out
    lr: float | None = None  # None: the grind's lr
    batch: int = 4  # decisions per step

    def params(self) -> dict | None:
        """The warm-up's settings, part of what makes two grinds the same work."""
        if not self.steps:
            return None
        return {"steps": self.steps, "episodes": self.episodes, "options": self.options,
                "skip_pages": list(self.skip_pages), "lr": self.lr, "batch": self.batch}


@dataclass
class Grind:
    """One grind's settings beside its GrpoConfig: the training budget, the held-out
    evaluation and where the result goes."""

    steps: int = 20
    lr: float = 2e-4
    rank: int = 16  # LoRA rank (alpha is twice it)
    seed: int = 0
    eval_seeds: int = 64  # held-out seeds evaluated before and after (0: skip)
    eval_temperature: float = 0.0
    tenant: str | None = None  # register the adapter as a candidate version of this tenant
    out: str | None = None  # default: $ONTHEJOB_HOME/runs/<run id>
    plot: str | None = None  # default: OUT/curve.png
    model: str | None = None  # local HF model directory (default: embedded)
    command: str | None = None  # the command line, kept in the record
    warmup: Warmup = field(default_factory=Warmup)


def warmup_examples(warmup: Warmup, cfg: GrpoConfig) -> tuple[list, dict] | None:
    """The scripted decisions the warm-up imitates and the env options they were played with
    (None without a warm-up)."""
    from onthejob.envs.registry import parse_options
    from onthejob.learn.warmup import check_skip_pages, scripted_examples, warmup_seeds

    if warmup.steps < 0 or warmup.batch < 1 or warmup.episodes < 0:
        raise ValueError("--warmup-steps, --warmup-episodes and --warmup-batch must not be "
                         "negative (--warmup-batch at least 1)")
    if not warmup.steps:
        return None
    check_skip_pages(cfg.env, warmup.skip_pages)
    options = cfg.options if warmup.options is None else parse_options(warmup.options)
    examples = scripted_examples(cfg.env, options, warmup_seeds(warmup.episodes),
                                 skip_pages=warmup.skip_pages)
    if not examples:
        raise ValueError("the warm-up has nothing to imitate: no solved scripted episode, or "
                         "every decision is on a skipped page (raise --warmup-episodes)")
    return examples, options


def run_grind(grind: Grind, cfg: GrpoConfig, rule, store=None,
              imitate: tuple[list, dict] | None = None) -> dict:
    """Warm up (when `imitate`, from `warmup_examples`, is given), train with `rule` (a
    `Grpo` of `cfg`), evaluate before and after, save or register the adapter, plot; returns
    the record written to OUT/curve.json."""
    from onthejob import config, faults
    from onthejob.envs.held_out import evaluate
    from onthejob.learn.loop import STUDENT, TrainConfig, Trainer, config_dict, print_progress
    from onthejob.model import load_model
    from onthejob.model.adapters import LoraSpec, save

    started = time.time()
    train = TrainConfig(steps=grind.steps, lr=grind.lr, seed=grind.seed,
                        lora=LoraSpec(rank=grind.rank, alpha=2 * grind.rank))
    params = {"env": cfg.env, "options": cfg.options, "train": config_dict(train),
              "grpo": _plain_cfg(cfg), "warmup": grind.warmup.params()}
    resumed = None
    if store:
        for dead in store.interrupt_dead_runs():
            print(f"run {dead.id} ({dead.kind}) had stopped mid-way; marked interrupted",
                  file=sys.stderr, flush=True)
        resumed = _resumable(store, grind.tenant, params)
    if resumed is not None:  # its folder and rollout log go on
        rule.run_id, out = resumed.params["run_id"], Path(resumed.params["out"])
    else:
        out = Path(grind.out) if grind.out else config.home() / "runs" / rule.run_id
    out.mkdir(parents=True, exist_ok=True)
    carried = _unfinished(out, params)
    if resumed is None and carried is not None:
        rule.run_id = carried["run_id"]
    if resumed is not None or carried is not None:
        print(f"resuming the unfinished grind in {out}"
              + (f" (interrupted run {resumed.id})" if resumed else ""), file=sys.stderr,
              flush=True)
    plot = Path(grind.plot) if grind.plot else out / "curve.png"
    lm = load_model(grind.model)
    seeds = eval_seeds(grind.eval_seeds)

    def held_out() -> dict | None:
        if not seeds:
            return None
        t = time.time()
        result = evaluate(lm, cfg.env, cfg.options, seeds, cfg.max_turns, cfg.max_new_tokens,
                          temperature=grind.eval_temperature, system=cfg.system,
                          solved_at=cfg.solved_at)
        result["seconds"] = time.time() - t
        return result

    print(f"grind {cfg.env} {cfg.options}: {grind.steps} steps x {cfg.starts} groups x "
          f"{cfg.group} rollouts, lr {grind.lr}, run {rule.run_id}", file=sys.stderr, flush=True)
    before = carried["eval_before"] if carried is not None else held_out()
    if before and carried is None:
        print(f"held-out before: reward {before['reward']:.3f} solved {before['solved']:.3f} "
              f"on {len(seeds)} seeds ({before['seconds']:.0f} s)", file=sys.stderr, flush=True)
    run_row = store.create_run("grind", grind.tenant, params={
        **params, "run_id": rule.run_id, "out": str(out),
        "resumed_from": resumed.id if resumed else None}) if store else None
    if resumed is not None:
        store.update_run(resumed.id, progress={"resumed_by": run_row.id})
    record = {"command": grind.command,
              "run_id": rule.run_id, "env": cfg.env, "options": cfg.options,
              "grpo": _plain_cfg(cfg), "train": config_dict(train), "params": params,
              "eval_before": before}
    if carried is not None and carried.get("warmup"):
        record["warmup"] = carried["warmup"]
    _write(out / "curve.json", record)  # what a resume checks its work against
    parent = None
    if record.get("warmup") and (out / "warmup-adapter").exists():
        parent = out / "warmup-adapter"  # the warm-up finished before the kill
    elif imitate:
        try:
            parent, record["warmup"] = _warm_up(grind, cfg, lm, train, imitate, out, held_out)
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
        from onthejob.learn.consolidate import register_candidate

        _, _, adapter = register_candidate(
            store, lm, "tenant", grind.tenant, "grpo", rule.run_id, (), None, None,
            metrics=metrics, reason=f"grpo on {cfg.env}",
            meta={"env": cfg.env, "options": cfg.options})
        where = Path(adapter.path)
        store.update_run(run_row.id, status="done", progress={"adapter": adapter.id})
        where_text = f"candidate v{adapter.version} of tenant {grind.tenant} ({where})"
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
    return record


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


def _warm_up(grind: Grind, cfg: GrpoConfig, lm, train, imitate: tuple[list, dict], out: Path,
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

    warmup, (examples, options) = grind.warmup, imitate
    started = time.time()
    eot = min(end_of_turn_ids(lm.tokenizer) - {None}, default=None)
    pairs = encode_examples(lm, examples, cfg.system, eot)
    pages = Counter(e.page for e in examples if e.page)
    verbs = Counter(" ".join(e.action.split()[:2]) for e in examples)
    lr = warmup.lr if warmup.lr is not None else grind.lr
    print(f"warm-up: imitate {len(examples)} scripted decisions from {warmup.episodes} "
          f"episodes of {cfg.env} {options} (seeds {examples[0].seed}..), "
          f"{warmup.steps} steps x {warmup.batch}, lr {lr}"
          + (f"; pages left out: {', '.join(warmup.skip_pages)}" if warmup.skip_pages
             else ""), file=sys.stderr, flush=True)
    warm = Trainer(lm, replace(train, steps=warmup.steps, lr=lr))
    warm.run(Imitation(pairs, batch_size=warmup.batch),
             progress=print_progress(f"[warm-up {cfg.env}] "), checkpoint=out / "warmup-checkpoint")
    where = out / "warmup-adapter"
    set_aside(where, "previous")
    save(lm.model, STUDENT, where, meta={"method": "imitation", "env": cfg.env,
                                         "options": options})
    seconds = time.time() - started
    with warm.frozen_student():
        evaluation = held_out()
    detach(lm, STUDENT)  # GRPO's trainer attaches its student as a copy of the saved one
    if evaluation:
        print(f"held-out after warm-up: reward {evaluation['reward']:.3f} solved "
              f"{evaluation['solved']:.3f} (warm-up {seconds:.0f} s)", file=sys.stderr, flush=True)
    return where, {
        "steps": warmup.steps, "batch": warmup.batch, "lr": lr,
        "episodes": warmup.episodes, "options": options,
        "skip_pages": list(warmup.skip_pages), "seeds": [examples[0].seed, examples[-1].seed],
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
