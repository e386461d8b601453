"""Group rollouts: N episodes of one policy from one start state, in parallel, all logged.

Where things run (decided by the policy, not by the caller):
- a local policy (scripted, random: cheap and picklable) runs *with* its environments in
  the workers, whole episodes at a time, many episodes per task;
- a lockstep policy (`policy.lockstep = True`, e.g. `ModelPolicy`) stays in the parent and
  acts on the whole group in one batch per step; only the environment steps go to the
  backend (each worker gets the state, the action, and returns the new state). The model
  then never leaves the parent process and never needs pickling.

A rollout whose worker crashed, whose env raised, or whose sandbox stopped the code is a
*fault*: `Rollout.fault` says why and `Rollout.reward` is None, so trainers skip it (see
`trainable`). Every rollout is appended as one JSON line to
$ONTHEJOB_HOME/runs/<run_id>/rollouts.jsonl; `onthejob replay RUN_ID` checks them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onthejob import config
from onthejob.envs.policies import Action, Policy
from onthejob.envs.registry import make
from onthejob.envs.workers import (
    Backend,
    EpisodeJob,
    append_step,
    make_backend,
    paused_gc,
    run_episodes,
    step_env,
)


@dataclass
class Rollout:
    run_id: str
    group: int
    index: int
    env: str
    version: str
    options: dict
    seed: int
    actions: list[str]
    observations: list[str]  # the first observation, then one per step
    rewards: list[float]
    dones: list[bool]
    infos: list[dict]
    state_hashes: list[str]  # after reset, then after each step
    prompt_ids: list[list[int] | None]
    token_ids: list[list[int] | None]
    logprobs: list[list[float] | None]
    fault: str | None = None
    env_s: float = 0.0
    policy_s: float = 0.0

    @property
    def reward(self) -> float | None:
        """The episode's return, or None for a fault (it is not a 0)."""
        return None if self.fault else float(sum(self.rewards))

    @property
    def done(self) -> bool:
        return bool(self.dones and self.dones[-1])


@dataclass
class GroupResult:
    run_id: str
    rollouts: list[Rollout]
    wall_s: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> list[Rollout]:
        return [r for r in self.rollouts if r.fault is None]


def new_run_id(prefix: str = "envs") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_dir(run_id: str) -> Path:
    return config.home() / "runs" / run_id


def run_group(env_name: str, seed: int, n: int, policy: Policy,
              backend: str | Backend = "process", max_steps: int = 50,
              options: dict | None = None, run_id: str | None = None, group: int = 0,
              log: bool = True, chunks: int | None = None) -> GroupResult:
    """N rollouts of `policy` in `env_name` from reset(seed); see the module docstring."""
    options = dict(options or {})
    probe = make(env_name, **options)  # fail early on a bad name or options
    run_id = run_id or new_run_id()
    own = not isinstance(backend, Backend)
    engine = make_backend(backend)
    started = time.perf_counter()
    try:
        with paused_gc():
            if getattr(policy, "lockstep", False):
                records = _lockstep(env_name, options, seed, n, policy, engine, max_steps)
            else:
                records = _episodes(env_name, options, seed, n, policy, engine, max_steps,
                                    chunks)
            rollouts = [Rollout(run_id=run_id, group=group, env=env_name,
                                version=probe.version, options=options, seed=seed, **record)
                        for record in records]
    finally:
        if own:
            engine.close()
    wall = time.perf_counter() - started
    if log:
        write_rollouts(run_id, rollouts)
    steps = sum(len(r.actions) for r in rollouts)
    stats = {"steps": steps, "steps_per_s": steps / wall if wall else 0.0,
             "env_s": sum(r.env_s for r in rollouts), "policy_s": sum(r.policy_s for r in rollouts),
             "faults": sum(r.fault is not None for r in rollouts), "backend": engine.name}
    return GroupResult(run_id, rollouts, wall, stats)


def _episodes(env_name: str, options: dict, seed: int, n: int, policy: Policy, engine: Backend,
              max_steps: int, chunks: int | None) -> list[dict]:
    parts = max(1, min(n, chunks or engine.workers))
    jobs = [EpisodeJob(env_name, options, seed, tuple(range(n))[i::parts], max_steps, policy)
            for i in range(parts)]
    records = []
    for job, outcome in zip(jobs, engine.map(run_episodes, [(job,) for job in jobs]), strict=True):
        if outcome.error is None:
            records.extend(outcome.value)
        else:
            records.extend(_fault_record(i, outcome.error) for i in job.indices)
    return sorted(records, key=lambda r: r["index"])


def _fault_record(index: int, error: str) -> dict:
    return {"index": index, "actions": [], "observations": [], "rewards": [], "dones": [],
            "infos": [], "state_hashes": [], "prompt_ids": [], "token_ids": [], "logprobs": [],
            "fault": error}


def _lockstep(env_name: str, options: dict, seed: int, n: int, policy: Policy,
              engine: Backend, max_steps: int) -> list[dict]:
    env = make(env_name, **options)
    first = env.reset(seed)
    start, start_hash = env.snapshot(), env.state_hash()
    states = [start] * n
    records = [_fault_record(i, None) for i in range(n)]
    for record in records:
        record.update(observations=[first], state_hashes=[start_hash], env_s=0.0, policy_s=0.0)
    alive = list(range(n))
    for _ in range(max_steps):
        if not alive:
            break
        t = time.perf_counter()
        actions: list[Action] = policy.act([records[i]["observations"][-1] for i in alive])
        policy_share = (time.perf_counter() - t) / len(alive)
        t = time.perf_counter()
        outcomes = engine.map(step_env, [(env_name, options, states[i], a.text)
                                         for i, a in zip(alive, actions, strict=True)])
        env_share = (time.perf_counter() - t) / len(alive)
        still = []
        for i, action, outcome in zip(alive, actions, outcomes, strict=True):
            record = records[i]
            record["policy_s"] += policy_share
            record["env_s"] += env_share
            if outcome.error is not None:
                record["fault"] = outcome.error
                continue
            result, states[i], state_hash = outcome.value
            append_step(record, action, result, state_hash)
            if not (record["fault"] or result.done):
                still.append(i)
        alive = still
    return records


def write_rollouts(run_id: str, rollouts: list[Rollout]) -> Path:
    path = run_dir(run_id)
    path.mkdir(parents=True, exist_ok=True)
    target = path / "rollouts.jsonl"
    with open(target, "a") as handle:
        for rollout in rollouts:
            handle.write(json.dumps(asdict(rollout), default=str) + "\n")
    return target


def read_rollouts(run_id: str) -> list[Rollout]:
    target = run_dir(run_id) / "rollouts.jsonl"
    if not target.exists():
        raise FileNotFoundError(f"no rollouts logged for run {run_id!r} (looked for {target})")
    with open(target) as handle:
        return [Rollout(**json.loads(line)) for line in handle if line.strip()]
