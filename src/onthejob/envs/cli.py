"""`onthejob envs ...`, `onthejob replay RUN_ID` and `onthejob bench envs`."""

from __future__ import annotations

import argparse
import sys

from onthejob.envs.base import EnvError
from onthejob.envs.registry import list_envs, make, parse_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("envs", help="list or play the grindable environments",
                       description="List the environments, or play one from the keyboard.")
    esub = p.add_subparsers(dest="envs_command", metavar="ACTION", required=True)
    ls = esub.add_parser("list", help="list the environments",
                         description="List every environment: built-in and from entry points.")
    ls.set_defaults(func=_list)
    play = esub.add_parser(
        "try", help="play an environment from stdin",
        description="Play NAME: each line you type is one action (end a multi-line action, "
        "like the code env's `write PATH`, with a line holding only '.'). Ctrl-D quits.")
    play.add_argument("name", help="environment name (see `onthejob envs list`)")
    play.add_argument("--seed", type=int, default=0, help="the task's seed (default 0)")
    play.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="an environment option, e.g. difficulty=2 (repeatable; JSON values)")
    play.set_defaults(func=_try)

    rp = sub.add_parser("replay", help="replay a run's logged rollouts and check them",
                        description="Replay every rollout logged under "
                        "$ONTHEJOB_HOME/runs/RUN_ID/rollouts.jsonl without a model; check each "
                        "observation, reward and state hash; print OK or the first divergence.")
    rp.add_argument("run_id", help="the run's id (a folder name under $ONTHEJOB_HOME/runs)")
    rp.set_defaults(func=_replay)

    bsub = bench_subparsers(sub)
    be = bsub.add_parser("envs", help="benchmark the environments",
                         description="Time shop reset/snapshot/restore, scripted env steps/s on "
                         "1 and 2 worker processes, Ray against the process pool, and the share "
                         "of rollout time in the env vs the model; write a markdown table.")
    be.add_argument("--out", default="docs/results/envs.md", help="markdown file to write")
    be.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    be.add_argument("--no-ray", action="store_true", help="skip the Ray measurement")
    be.add_argument("--model", default="tiny",
                    help="model for the env/model time share: 'tiny' (random weights, real "
                    "tokenizer), 'default', or a local HF directory")
    be.set_defaults(func=_bench_envs)


def bench_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """`onthejob bench`'s subcommands, shared with other packages that add benchmarks."""
    bench = sub.choices.get("bench") or sub.add_parser(
        "bench", help="run a benchmark", description="Run a benchmark; each writes its "
        "figures to a file.")
    for action in bench._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)


def _list(args: argparse.Namespace) -> int:
    for name in list_envs():
        try:
            env = make(name)
            doc = (sys.modules[type(env).__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:10s} v{env.version}  {doc}")
        except Exception as exc:  # a broken third-party env should not hide the others
            print(f"{name:10s} (cannot be made: {exc})")
    return 0


def _read_action(stream) -> str | None:
    line = stream.readline()
    if not line:
        return None
    if not line.startswith("write "):
        return line.rstrip("\n")
    lines = [line.rstrip("\n")]
    for more in stream:
        if more.rstrip("\n") == ".":
            break
        lines.append(more.rstrip("\n"))
    return "\n".join(lines)


def _try(args: argparse.Namespace) -> int:
    try:
        env = make(args.name, **parse_options(args.option))
    except (EnvError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(env.reset(args.seed))
    total = 0.0
    while True:
        print("> ", end="", flush=True)
        action = _read_action(sys.stdin)
        if action is None:
            print(f"\nquit; return so far {total}")
            return 0
        result = env.step(action)
        total += result.reward
        print(result.observation)
        print(f"[reward {result.reward} done {result.done} info {result.info}]")
        if result.done:
            print(f"episode over: return {total}; state hash {env.state_hash()[:16]}")
            return 0


def _replay(args: argparse.Namespace) -> int:
    from onthejob.envs.replay import replay
    from onthejob.envs.rollout import read_rollouts

    try:
        rollouts = read_rollouts(args.run_id)
    except FileNotFoundError as exc:
        print(f"error: {exc}; list the runs with `ls $ONTHEJOB_HOME/runs`", file=sys.stderr)
        return 2
    bad = 0
    for rollout in rollouts:
        report = replay(rollout)
        tag = f"group {rollout.group} rollout {rollout.index} ({rollout.env} seed {rollout.seed})"
        if report.ok:
            print(f"OK   {tag}: {len(rollout.actions)} steps" + (
                f" [fault: {rollout.fault}]" if rollout.fault else ""))
        else:
            bad += 1
            print(f"DIFF {tag}: {report.divergence}")
    print(f"{len(rollouts) - bad}/{len(rollouts)} rollouts replay exactly")
    return 1 if bad else 0


def _bench_envs(args: argparse.Namespace) -> int:
    from onthejob.bench.envs import main as bench_main

    return bench_main(out=args.out, quick=args.quick, ray=not args.no_ray, model=args.model)
