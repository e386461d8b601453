"""Held-out evaluation of a model policy in an environment: mean reward and share solved,
one episode per seed, on seeds that no training draws (GRPO's start seeds are below
learn/grpo.py's TRAIN_SEEDS, the warm-up's from learn/warmup.py's WARMUP_SEED_BASE; these
from EVAL_SEED_BASE up). torch and the model are imported inside `evaluate`, so that
importing envs stays light."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onthejob.envs.model_policy import SYSTEM, ModelPolicy
from onthejob.envs.registry import make

EVAL_SEED_BASE = 10_000_000


def evaluate(lm: Any, env: str, options: dict, seeds: Sequence[int], max_turns: int,
             max_new_tokens: int, temperature: float = 0.0, system: str | None = SYSTEM,
             solved_at: float = 1.0, batch: int = 32) -> dict[str, float]:
    """Mean reward and share solved of the model as it is now (whatever adapters are active),
    one episode per seed, the seeds' episodes decoded together in lockstep batches."""
    import torch

    from onthejob.model import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
    policy = ModelPolicy(lm, params, system=system)
    rewards: list[float] = []
    turns = 0
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(seeds), batch):
                envs = [make(env, **options) for _ in seeds[start: start + batch]]
                obs = [e.reset(s) for e, s in zip(envs, seeds[start: start + batch], strict=True)]
                total = [0.0] * len(envs)
                alive = list(range(len(envs)))
                for _ in range(max_turns):
                    if not alive:
                        break
                    actions = policy.act([obs[i] for i in alive])
                    still = []
                    for i, action in zip(alive, actions, strict=True):
                        result = envs[i].step(action.text)
                        turns += 1
                        obs[i] = result.observation
                        total[i] += result.reward
                        if not result.done:
                            still.append(i)
                    alive = still
                rewards += total
    finally:
        model.train(was_training)
    return {"reward": sum(rewards) / len(rewards),
            "solved": sum(r >= solved_at for r in rewards) / len(rewards),
            "episodes": float(len(rewards)), "turns": turns / len(rewards)}


def eval_seeds(n: int, offset: int = 0) -> list[int]:
    """Held-out seeds: disjoint from every training seed."""
    return list(range(EVAL_SEED_BASE + offset, EVAL_SEED_BASE + offset + n))
