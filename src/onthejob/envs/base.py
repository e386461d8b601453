"""The environment contract: reset, step, snapshot, restore, fork and a state hash.

Determinism: (name, version, options, seed, action log) reproduces every observation and
reward byte for byte. Snapshots are plain JSON-able values (tuples, strings, numbers), so
they are cheap to copy, cheap to ship to a worker and hash the same in every process.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


class EnvError(RuntimeError):
    """An environment was misused (unknown name, step before reset, bad state)."""


@dataclass(frozen=True)
class StepResult:
    """One step's outcome. An episode that ends because the environment's own step limit ran
    out (not because the task was finished or failed) says so with `info["truncated"] = True`
    (Gymnasium's `truncated`, as opposed to `terminated`)."""

    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


def canonical_json(value: Any) -> str:
    """One byte-exact text per value: sorted keys, no spaces, tuples as lists."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


class Env(ABC):
    """A task world. Subclasses set `name`, `version` and implement the five methods.

    `options` are the keyword arguments the environment was made with (difficulty, ...);
    they are part of its identity and are logged with every rollout.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0"

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = dict(options)

    @abstractmethod
    def reset(self, seed: int) -> str:
        """Start the task that `seed` names; return the first observation."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply one action (text in the environment's action language)."""

    @abstractmethod
    def snapshot(self) -> Any:
        """The whole state as an immutable JSON-able value."""

    @abstractmethod
    def restore(self, state: Any) -> None:
        """Return exactly to a state `snapshot()` gave."""

    def fork(self, n: int) -> list[Env]:
        """n independent copies of the current state."""
        state = self.snapshot()
        copies = []
        for _ in range(n):
            env = type(self)(**self.options)
            env.restore(state)
            copies.append(env)
        return copies

    def state_hash(self) -> str:
        """sha256 of the canonical serialization of the identity and the state."""
        return canonical_hash([self.name, self.version, self.options, self.snapshot()])

    @property
    def spec(self) -> dict[str, Any]:
        return {"env": self.name, "version": self.version, "options": dict(self.options)}
