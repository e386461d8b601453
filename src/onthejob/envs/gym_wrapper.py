"""A Gymnasium view of any onthejob environment: Text observation and action spaces.

    env = GymEnv("shop")             # or GymEnv(make("arith", difficulty=2))
    env = GymEnv("shop", max_steps=20)   # keywords other than the wrapper's are env options
    obs, info = env.reset(seed=3)
    obs, reward, terminated, truncated, info = env.step("search blue kettle")

Importing this module registers every built-in environment with Gymnasium as
`onthejob/NAME-vVERSION`, so `gymnasium.make("onthejob/shop-v1", max_steps=20)` works, and
`gymnasium.make("onthejob.envs.gym_wrapper:onthejob/shop-v1")` without importing it first;
`register_gymnasium(name)` registers others (from entry points, or `register`ed at run time).

`terminated` is True when the task ended (solved or failed); `truncated` when it ran out of
steps: the environment's own step limit (its StepResult says `info["truncated"]`) or the
wrapper's `max_episode_steps` (None: none of its own; `gymnasium.make(...,
max_episode_steps=N)` adds Gymnasium's TimeLimit instead). Observations longer than
`max_length` characters are cut (the Text space needs a bound).
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from onthejob.envs.base import Env
from onthejob.envs.registry import make

CHARSET = string.printable
BUILTIN = ("arith", "code", "shop")


class GymEnv(gym.Env):
    metadata = {"render_modes": ["ansi"]}

    def __init__(self, env: str | Env, max_length: int = 8192,
                 max_episode_steps: int | None = None, render_mode: str | None = None,
                 **options: Any) -> None:
        self.env = make(env, **options) if isinstance(env, str) else env
        self.max_length, self.render_mode = max_length, render_mode
        self.max_episode_steps = max_episode_steps
        self.observation_space = spaces.Text(max_length=max_length, charset=CHARSET)
        self.action_space = spaces.Text(max_length=4096, charset=CHARSET)
        self._steps, self._last = 0, ""

    def _clip(self, text: str) -> str:
        return "".join(c if c in CHARSET else "?" for c in text[: self.max_length])

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        self._steps = 0
        self._last = self._clip(self.env.reset(seed))
        return self._last, {"seed": seed, "state_hash": self.env.state_hash()}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        result = self.env.step(action)
        self._steps += 1
        self._last = self._clip(result.observation)
        out_of_steps = bool(result.info.get("truncated"))
        terminated = result.done and not out_of_steps
        truncated = out_of_steps or (not result.done and self.max_episode_steps is not None
                                     and self._steps >= self.max_episode_steps)
        info = dict(result.info, state_hash=self.env.state_hash())
        return self._last, float(result.reward), terminated, truncated, info

    def render(self) -> str | None:
        return self._last if self.render_mode == "ansi" else None


def register_gymnasium(name: str, version: str | None = None) -> str:
    """Register environment `name` for `gymnasium.make` as `onthejob/NAME-vVERSION` (its
    own version unless given; Gymnasium versions are integers, others go unversioned) and
    return that id. Keywords given to `gymnasium.make` reach the environment as options."""
    version = str(make(name).version if version is None else version)
    env_id = f"onthejob/{name}-v{version}" if version.isdigit() else f"onthejob/{name}"
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=GymEnv, kwargs={"env": name})
    return env_id


for _name in BUILTIN:
    register_gymnasium(_name)
