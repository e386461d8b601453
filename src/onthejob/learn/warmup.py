"""A supervised warm-up before GRPO: imitate the scripted policy for a few steps.

RLVR learns only from groups whose rewards differ. When the base model never earns a reward
(the default model on `shop`: it never writes a valid action), every group is flat and GRPO
cannot start. The warm-up gives it a non-zero starting rate:

  1. `scripted_examples` plays the env's `ScriptedPolicy` for one episode per warm-up seed and
     keeps every decision (the observation the policy saw, the action it took). Warm-up seeds
     come from their own range (`WARMUP_SEED_BASE` up), disjoint from GRPO's training seeds and
     from the held-out evaluation seeds. Decisions on the pages named in `skip_pages` (shop:
     `<page name="...">`) are left out, so an action can be kept out of the warm-up entirely
     and the reward on it must come from transfer and from GRPO, not from imitation;
  2. `Imitation` is a learning rule of the one training loop: next-token cross-entropy on the
     action's tokens (and the end-of-turn token), given the very prompt the model policy
     renders for that observation (same system prompt, same chat template). The prompt's own
     tokens are not trained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from onthejob.envs.base import EnvError
from onthejob.envs.policies import ScriptedPolicy
from onthejob.envs.registry import make
from onthejob.learn.loop import Trainer
from onthejob.learn.scoring import response_logits

# Warm-up seeds: [WARMUP_SEED_BASE, WARMUP_SEED_BASE + n). GRPO trains on [0, 1,000,000) and
# evaluates from 10,000,000 up (grpo.TRAIN_SEEDS, envs/held_out.py EVAL_SEED_BASE).
WARMUP_SEED_BASE = 5_000_000
_PAGE = re.compile(r'<page name="(\w+)">')


@dataclass(frozen=True)
class Example:
    seed: int
    observation: str
    action: str
    page: str | None  # the shop page the decision was taken on (None for other envs)


def warmup_seeds(n: int) -> list[int]:
    return list(range(WARMUP_SEED_BASE, WARMUP_SEED_BASE + n))


def scripted_examples(env: str, options: dict[str, Any], seeds: Sequence[int],
                      max_turns: int = 100, skip_pages: Sequence[str] = ()) -> list[Example]:
    """The scripted policy's decisions, one episode per seed, without those on `skip_pages`.
    Only episodes the policy solved (reward > 0 at the end) are kept."""
    policy = ScriptedPolicy(env)  # ValueError for an env without one
    skip = set(skip_pages)
    out: list[Example] = []
    for seed in seeds:
        world = make(env, **options)
        observation = world.reset(seed)
        episode: list[Example] = []
        total = 0.0
        for _ in range(max_turns):
            [action] = policy.act([observation])
            page = _PAGE.search(observation)
            episode.append(Example(seed, observation, action.text, page.group(1) if page else None))
            result = world.step(action.text)
            total += result.reward
            observation = result.observation
            if result.done:
                break
        if total > 0:
            out += [e for e in episode if e.page not in skip]
    return out


def encode_examples(lm: Any, examples: Sequence[Example], system: str | None,
                    eot: int | None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per example, the prompt rendered as `ModelPolicy` renders it."""
    from onthejob.envs.model_policy import ModelPolicy

    policy = ModelPolicy(lm, system=system)
    tok = lm.tokenizer
    pairs = []
    for e in examples:
        response = tok(e.action, add_special_tokens=False)["input_ids"]
        if eot is not None:
            response = [*response, eot]
        pairs.append((policy.prompt_ids(e.observation), response))
    return pairs


class Imitation:
    """Cross-entropy on the response tokens of (prompt, response) pairs, `batch_size` drawn at
    random per step. Metrics: `nll` (mean per response token) and `token_acc` (share of
    response tokens that are the model's argmax)."""

    name = "imitation"

    def __init__(self, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 8):
        self.pairs = [(list(p), list(r)) for p, r in pairs if p and r]
        if not self.pairs:
            raise ValueError("nothing to imitate: no examples")
        self.batch_size = batch_size

    def prepare(self, trainer: Trainer) -> None:
        pass

    def step(self, trainer: Trainer, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = trainer.rng.sample(self.pairs, min(self.batch_size, len(self.pairs)))
        logits = response_logits(trainer.lm, [p for p, _ in batch], [r for _, r in batch])
        labels = torch.tensor([t for _, r in batch for t in r], device=logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        acc = float((logits.detach().argmax(-1) == labels).float().mean())
        return loss, {"nll": float(loss.detach()), "token_acc": acc}


def check_skip_pages(env: str, skip_pages: Sequence[str]) -> None:
    if skip_pages and env != "shop":
        raise EnvError("--warmup-skip-page applies to the shop's pages only")
