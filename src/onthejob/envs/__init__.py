"""Grindable environments: deterministic, replayable, forkable task worlds with checkable rewards.

Owns the environment contract (`base`), the registry (`registry`), the built-in worlds
(`arith`; `code_env`, the `code` environment, with its task repositories in `code_repos`;
`shop`, with its world of catalog, tasks and pages in `shop_world`), the sandbox for untrusted code (`sandbox`),
policies and parallel group rollouts with their logs (`policies`, `rollout`, `workers`), the
model as a policy (`model_policy`) and its held-out evaluation (`held_out`), replay
(`replay`), a Gymnasium wrapper (`gym_wrapper`) and the `onthejob envs` / `onthejob replay`
commands (`cli`). May import onthejob.config and onthejob.model only (the model lazily,
inside `ModelPolicy` and `held_out.evaluate`, so that workers stay light).
"""

from onthejob.envs.base import Env, EnvError, StepResult, canonical_hash
from onthejob.envs.registry import list_envs, make, register

__all__ = ["Env", "EnvError", "StepResult", "canonical_hash", "list_envs", "make", "register"]
