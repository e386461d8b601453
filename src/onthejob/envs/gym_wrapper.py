"""A Gymnasium view of any onthejob environment: Text observation and action spaces.

    env = GymEnv("shop")             # or GymEnv(make("arith", difficulty=2))
    obs, info = env.reset(seed=3)
    obs, reward, terminated, truncated, info = env.step("search blue kettle")

Observations longer than `max_length` characters are cut (the Text space needs a bound);
`truncated` is True when `max_steps` steps pass without the episode ending.
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from onthejob.envs.base import Env
from onthejob.envs.registry import make

CHARSET = string.printable


class GymEnv(gym.Env):
    metadata = {"render_modes": ["ansi"]}

    def __init__(self, env: str | Env, max_length: int = 8192, max_steps: int = 100,
                 render_mode: str | None = None, **options: Any) -> None:
        self.env = make(env, **options) if isinstance(env, str) else env
        self.max_length, self.max_steps, self.render_mode = max_length, max_steps, render_mode
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
        truncated = not result.done and self._steps >= self.max_steps
        info = dict(result.info, state_hash=self.env.state_hash())
        return self._last, float(result.reward), bool(result.done), truncated, info

    def render(self) -> str | None:
        return self._last if self.render_mode == "ansi" else None
