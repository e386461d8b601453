"""GRPO: reinforcement learning with verifiable rewards on the grindable environments.

Each step, on the one training loop (`Trainer`):
  1. pick `starts` start seeds; from each, run a group of `group` rollouts of the student
     (sampling, eval mode, no grad) with `run_group` and `ModelPolicy` (its one `generate`
     call encodes the group's shared first prompt once) - every rollout is logged and
     replayable (`onthejob replay RUN_ID`);
  2. the reward of a rollout is its return from the environment's checker. A rollout with a
     fault (sandbox timeout or crash, a worker that died) has no reward: it is left out of
     its group's statistics and out of the loss;
  3. group-relative advantages: A = r - mean(group), divided by the group's std unless
     `scale_std` is off. A group whose rewards are all equal (or with fewer than two valid
     rollouts) teaches nothing and is skipped (counted in `groups_flat`);
  4. the trained tokens are the tokens the policy sampled on every turn of the episode
     (multi-turn environments such as `shop`: each turn is its own prompt, the observation,
     and its own sampled reply, all with the episode's advantage), plus the end-of-turn token
     where the reply ended with one;
  5. loss per token: PPO's clipped surrogate -min(rho A, clip(rho, 1-eps, 1+eps_high) A),
     rho = exp(logp - logp_sampling), over `epochs` inner updates of the same rollouts;
     plus `beta` * KL(student || base) with the k3 estimator exp(d) - d - 1, d = logp_base
     - logp. Tokens are averaged over the whole step (`agg="token"`) or per rollout first
     (`agg="rollout"`).
Long batches are split into micro-batches of at most `micro_tokens` padded tokens whose
gradients accumulate, so memory stays flat however long the episodes are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from onthejob.envs.model_policy import SYSTEM, ModelPolicy
from onthejob.envs.policies import Policy
from onthejob.envs.registry import make
from onthejob.envs.rollout import Rollout, new_run_id, run_group
from onthejob.learn.loop import Trainer
from onthejob.learn.scoring import shared_prompt_logprobs
from onthejob.model import SamplingParams
from onthejob.model.chat import end_of_turn_ids

# Training start seeds come from [0, TRAIN_SEEDS); held-out evaluations use seeds from
# envs/held_out.py's EVAL_SEED_BASE up.
TRAIN_SEEDS = 1_000_000


@dataclass
class GrpoConfig:
    env: str = "arith"
    options: dict[str, Any] = field(default_factory=dict)
    group: int = 8  # rollouts per start state
    starts: int = 2  # start states per step
    max_turns: int = 1  # environment steps per episode at most
    max_new_tokens: int = 16  # tokens per reply
    temperature: float = 1.0
    top_p: float = 1.0
    system: str | None = SYSTEM
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: same as clip_eps (DAPO's clip-higher otherwise)
    beta: float = 0.0  # weight of KL(student || base) in the loss
    kl_every: int = 1  # with beta 0, measure the KL to the base every k steps (0: never)
    scale_std: bool = True
    epochs: int = 1  # inner updates per batch of rollouts (the last is the loop's own)
    agg: str = "token"  # "token" or "rollout"
    solved_at: float = 1.0  # a rollout with at least this reward counts as solved
    micro_tokens: int = 2048
    backend: str = "inline"
    log_rollouts: bool = True

    def validate(self) -> None:
        if self.group < 2:
            raise ValueError("a group needs at least 2 rollouts (advantages are group-relative)")
        if self.starts < 1 or self.max_turns < 1 or self.max_new_tokens < 1 or self.epochs < 1:
            raise ValueError("starts, max_turns, max_new_tokens and epochs must be positive")
        if self.agg not in ("token", "rollout"):
            raise ValueError("agg must be 'token' or 'rollout'")
        if not 0 < self.clip_eps < 1:
            raise ValueError("clip_eps must be in (0, 1)")
        if self.beta < 0:
            raise ValueError("beta must be >= 0")


# ---- the math, separately testable ---------------------------------------------------------
def group_advantages(rewards: Sequence[float | None], scale_std: bool = True,
                     eps: float = 1e-6) -> list[float | None] | None:
    """Advantages for one group: r - mean (/ std). None for faults (reward None). The whole
    group is None when it cannot teach anything: fewer than two valid rollouts, or all equal."""
    valid = [r for r in rewards if r is not None]
    if len(valid) < 2:
        return None
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((r - mean) ** 2 for r in valid) / len(valid))
    if std < eps:
        return None
    scale = std + eps if scale_std else 1.0
    return [None if r is None else (r - mean) / scale for r in rewards]


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(rho A, clip(rho) A) and a mask of the tokens where the clip bit."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy: e^d - d - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ---- samples: one row per turn of a rollout that has an advantage --------------------------
@dataclass
class _Row:
    prompt: list[int]
    tokens: list[int]
    old: list[float]  # log-probs at sampling time; NaN where none was recorded (end of turn)
    adv: float
    rollout: int  # index of the rollout (for agg="rollout")


def rows_from_groups(groups: Sequence[Sequence[Rollout]], advantages: Sequence[list | None],
                     eot: int | None, max_new_tokens: int) -> list[_Row]:
    rows: list[_Row] = []
    n = 0
    for rollouts, adv in zip(groups, advantages, strict=True):
        if adv is None:
            continue
        for rollout, a in zip(rollouts, adv, strict=True):
            if a is None or rollout.fault:
                continue
            for prompt, tokens, logprobs in zip(rollout.prompt_ids, rollout.token_ids,
                                                rollout.logprobs, strict=True):
                if prompt is None or tokens is None:
                    continue
                tokens, old = list(tokens), list(logprobs or [])
                if eot is not None and len(tokens) < max_new_tokens:  # it stopped on end-of-turn
                    tokens.append(eot)
                    old.append(float("nan"))
                if tokens:
                    rows.append(_Row(list(prompt), tokens, old, float(a), n))
            n += 1
    return rows


def _chunks(rows: Sequence[_Row], budget: int) -> list[list[int]]:
    """Micro-batches: rows that share a prompt (a group's first turn) go together, encoded
    with the prompt once; the other rows are packed up to `budget` padded tokens."""
    by_prompt: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        by_prompt.setdefault(tuple(row.prompt), []).append(i)
    out, current, width = [], [], 0
    for idx in by_prompt.values():
        if len(idx) > 1:
            size = len(rows[idx[0]].prompt)
            part: list[int] = []
            for i in idx:  # the prompt once, plus every response beside it
                if part and size + sum(len(rows[j].tokens) for j in [*part, i]) > budget:
                    out.append(part)
                    part = []
                part.append(i)
            out.append(part)
            continue
        i = idx[0]
        size = len(rows[i].prompt) + len(rows[i].tokens)
        if current and max(width, size) * (len(current) + 1) > budget:
            out.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, size)
    if current:
        out.append(current)
    return out


class Grpo:
    name = "grpo"

    def __init__(self, cfg: GrpoConfig | None = None, run_id: str | None = None) -> None:
        self.cfg = cfg or GrpoConfig()
        self.cfg.validate()
        make(self.cfg.env, **self.cfg.options)  # fail early on a bad name or options
        self.run_id = run_id or new_run_id("grind")
        self.tokens_trained = 0
        self.rollouts = 0
        self.faults = 0

    def prepare(self, trainer: Trainer) -> None:
        ids = end_of_turn_ids(trainer.lm.tokenizer) - {None}
        self._eot = min(ids) if ids else None

    def policy(self, trainer: Trainer) -> Policy:
        cfg = self.cfg
        params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_p=cfg.top_p)
        return ModelPolicy(trainer.lm, params, system=cfg.system)

    # -- one step ----------------------------------------------------------------------------
    def step(self, trainer: Trainer, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        started = time.time()
        seeds = [trainer.rng.randrange(TRAIN_SEEDS) for _ in range(cfg.starts)]
        groups: list[list[Rollout]] = []
        with trainer.frozen_student(), torch.autocast(trainer.lm.device.type, enabled=False):
            policy = self.policy(trainer)
            for k, seed in enumerate(seeds):
                result = run_group(cfg.env, seed, cfg.group, policy, backend=cfg.backend,
                                   max_steps=cfg.max_turns, options=cfg.options,
                                   run_id=self.run_id, group=step * cfg.starts + k,
                                   log=cfg.log_rollouts)
                groups.append(result.rollouts)
        rollout_s = time.time() - started
        rewards = [[r.reward for r in g] for g in groups]
        valid = [x for g in rewards for x in g if x is not None]
        advantages = [group_advantages(g, cfg.scale_std) for g in rewards]
        rows = rows_from_groups(groups, advantages, self._eot, cfg.max_new_tokens)
        faults = sum(x is None for g in rewards for x in g)
        self.rollouts += sum(len(g) for g in groups)
        self.faults += faults
        metrics = {
            "reward": sum(valid) / len(valid) if valid else float("nan"),
            "solved": sum(x >= cfg.solved_at for x in valid) / len(valid) if valid else float("nan"),
            "groups_flat": float(sum(a is None for a in advantages)),
            "faults": float(faults),
            "turns": sum(len(r.actions) for g in groups for r in g) / max(sum(map(len, groups)), 1),
            "rollout_s": rollout_s,
        }
        if not rows:  # every group flat: nothing to learn from this batch
            metrics.update(tokens=0.0, kl=float("nan"), clip_frac=0.0, learn_s=0.0)
            zero = torch.zeros((), requires_grad=True)
            return zero, metrics
        learn_started = time.time()
        measure = cfg.beta > 0 or (cfg.kl_every > 0 and step % cfg.kl_every == 0)
        loss, learn = self._learn(trainer, rows, measure)
        self.tokens_trained += sum(len(r.tokens) for r in rows)
        metrics.update(learn, tokens=float(sum(len(r.tokens) for r in rows)),
                       learn_s=time.time() - learn_started)
        return loss, metrics

    def _learn(self, trainer: Trainer, rows: list[_Row],
               measure_kl: bool) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, lm = self.cfg, trainer.lm
        device = lm.device
        chunks = _chunks(rows, cfg.micro_tokens)
        # Per-token weights: the loss is sum(w * per-token loss), so chunks simply add up.
        n_tokens = sum(len(r.tokens) for r in rows)
        if cfg.agg == "token":
            weights = [[1.0 / n_tokens] * len(r.tokens) for r in rows]
        else:
            per_rollout: dict[int, int] = {}
            for r in rows:
                per_rollout[r.rollout] = per_rollout.get(r.rollout, 0) + len(r.tokens)
            weights = [[1.0 / (per_rollout[r.rollout] * len(per_rollout))] * len(r.tokens)
                       for r in rows]
        ref: list[torch.Tensor | None] = [None] * len(chunks)
        if measure_kl:
            with trainer.base():
                for c, idx in enumerate(chunks):
                    ref[c] = shared_prompt_logprobs(lm, [rows[i].prompt for i in idx],
                                                    [rows[i].tokens for i in idx]).float()
        # Per chunk: the log-prob each token had when it was sampled, its advantage, its weight.
        old_logps = [torch.tensor([x for i in idx for x in rows[i].old], device=device)
                     for idx in chunks]
        advs = [torch.tensor([rows[i].adv for i in idx for _ in rows[i].tokens], device=device)
                for idx in chunks]
        ws = [torch.tensor([x for i in idx for x in weights[i]], device=device) for idx in chunks]
        eps_high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
        stats: dict[str, float] = {}
        for epoch in range(cfg.epochs):
            last = epoch == cfg.epochs - 1
            if epoch:
                trainer.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            clipped = kl_sum = ratio_dev = 0.0
            final: torch.Tensor | None = None
            for c, idx in enumerate(chunks):
                logp = shared_prompt_logprobs(lm, [rows[i].prompt for i in idx],
                                              [rows[i].tokens for i in idx])
                old = old_logps[c]
                if epoch == 0:  # tokens without a sampling log-prob start on-policy (ratio 1)
                    old_logps[c] = old = torch.where(torch.isnan(old), logp.detach(), old)
                per_token, clip_mask = clipped_surrogate(logp, old, advs[c], cfg.clip_eps, eps_high)
                if ref[c] is not None:
                    kl = k3(logp, ref[c])
                    kl_sum += float((kl.detach() * ws[c]).sum())
                    if cfg.beta > 0:
                        per_token = per_token + cfg.beta * kl
                part = (per_token * ws[c]).sum()
                clipped += float((clip_mask.float() * ws[c]).sum())
                ratio_dev += float(((logp.detach() - old).exp() - 1).abs().mul(ws[c]).sum())
                total += float(part.detach())
                if last and c == len(chunks) - 1:
                    final = part  # the loop runs this one's backward
                else:
                    part.backward()
            if epoch == 0:
                stats["kl"] = kl_sum if any(r is not None for r in ref) else float("nan")
                stats["ratio_dev"] = ratio_dev
            stats["clip_frac"] = clipped
            if not last:  # an inner update, made the way the loop makes its own
                trainer.apply_gradients()
        assert final is not None
        # The value is the whole loss; the gradient of the earlier chunks is accumulated already.
        return final + (total - float(final.detach())), stats
