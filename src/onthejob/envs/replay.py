"""Replay logged rollouts without a model: same env, seed and actions; every observation,
reward and state hash must come out byte for byte as logged."""

from __future__ import annotations

from dataclasses import dataclass

from onthejob.envs.registry import make
from onthejob.envs.rollout import Rollout


@dataclass
class ReplayReport:
    rollout: Rollout
    ok: bool
    divergence: str = ""  # the first difference, in words


def replay(rollout: Rollout) -> ReplayReport:
    if not rollout.observations:  # a fault before the first observation: nothing to replay
        return ReplayReport(rollout, True, "")
    env = make(rollout.env, **rollout.options)
    if env.version != rollout.version:
        return ReplayReport(rollout, False, f"{rollout.env} is version {env.version}, the log "
                            f"was written by version {rollout.version}")
    checks = [("observation 0", env.reset(rollout.seed), rollout.observations[0]),
              ("state hash 0", env.state_hash(), rollout.state_hashes[0])]
    for what, got, logged in checks:
        if got != logged:
            return ReplayReport(rollout, False, _diff(what, got, logged))
    for step, action in enumerate(rollout.actions, start=1):
        result = env.step(action)
        if rollout.fault and step == len(rollout.actions) and rollout.fault.startswith("sandbox"):
            break  # a sandbox fault depends on the machine, not on the log: not compared
        for what, got, logged in (
            (f"observation {step}", result.observation, rollout.observations[step]),
            (f"reward {step}", result.reward, rollout.rewards[step - 1]),
            (f"done {step}", result.done, rollout.dones[step - 1]),
            (f"state hash {step}", env.state_hash(), rollout.state_hashes[step]),
        ):
            if got != logged:
                return ReplayReport(rollout, False, _diff(what, got, logged))
    return ReplayReport(rollout, True, "")


def _diff(what: str, got: object, logged: object) -> str:
    got_text, logged_text = str(got), str(logged)
    at = next((i for i, (a, b) in enumerate(zip(got_text, logged_text, strict=False)) if a != b),
              min(len(got_text), len(logged_text)))
    return (f"{what} differs at character {at}: replay gives {got_text[at:at + 60]!r}, "
            f"the log has {logged_text[at:at + 60]!r}")
