"""Group rollouts, their logs, replay, faults, the model policy and the Gymnasium wrapper."""

from __future__ import annotations

import json
import os

import pytest

from onthejob.cli import main as cli_main
from onthejob.envs.model_policy import ModelPolicy
from onthejob.envs.policies import Action, RandomPolicy, ScriptedPolicy
from onthejob.envs.replay import replay
from onthejob.envs.rollout import read_rollouts, run_dir, run_group
from onthejob.envs.workers import InlineBackend, ProcessBackend


class CrashPolicy:
    """Kills its worker process on the first action: an infrastructure fault."""

    def act(self, observations: list[str]) -> list[Action]:
        os._exit(13)


class RaisingPolicy:
    def act(self, observations: list[str]) -> list[Action]:
        raise RuntimeError("policy bug")


@pytest.fixture(scope="module")
def pool():
    with ProcessBackend(2) as backend:
        yield backend


@pytest.mark.parametrize("env", ["arith", "shop", "code"])
def test_scripted_group_on_the_process_pool_wins_and_logs(env, pool):
    group = run_group(env, 5, 4, ScriptedPolicy(env), backend=pool, run_id=f"t-{env}")
    assert [r.reward for r in group.rollouts] == [1.0] * 4
    assert [r.index for r in group.rollouts] == [0, 1, 2, 3]
    assert group.stats["faults"] == 0 and len(group.trainable) == 4
    lines = (run_dir(f"t-{env}") / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 4
    record = json.loads(lines[0])
    assert record["env"] == env and record["version"] == "1" and record["seed"] == 5
    assert len(record["state_hashes"]) == len(record["actions"]) + 1
    assert len(record["observations"]) == len(record["actions"]) + 1


def test_process_and_inline_backends_give_identical_rollouts(pool):
    a = run_group("shop", 9, 6, RandomPolicy("shop", 3), backend=pool, max_steps=20, log=False)
    b = run_group("shop", 9, 6, RandomPolicy("shop", 3), backend="inline", max_steps=20, log=False)
    strip = lambda g: [(r.actions, r.observations, r.rewards, r.state_hashes) for r in g.rollouts]  # noqa: E731
    assert strip(a) == strip(b)
    # spawn(index) gives each rollout its own random stream: the group is diverse
    assert len({tuple(r.actions) for r in a.rollouts}) > 1


def test_every_logged_rollout_replays_and_tampering_is_found(capsys):
    run_group("shop", 2, 3, RandomPolicy("shop", 1), backend="inline", max_steps=15, run_id="r1")
    run_group("arith", 2, 2, ScriptedPolicy("arith"), backend="inline", run_id="r1", group=1,
              options={"difficulty": 3})
    rollouts = read_rollouts("r1")
    assert len(rollouts) == 5 and all(replay(r).ok for r in rollouts)
    assert cli_main(["replay", "r1"]) == 0
    assert "5/5 rollouts replay exactly" in capsys.readouterr().out

    path = run_dir("r1") / "rollouts.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["observations"][3] = records[1]["observations"][3].replace("Cart", "Kart")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli_main(["replay", "r1"]) == 1
    out = capsys.readouterr().out
    assert "DIFF group 0 rollout 1" in out and "observation 3 differs" in out
    assert cli_main(["replay", "no-such-run"]) == 2
    assert "no rollouts logged" in capsys.readouterr().err


def test_a_worker_crash_is_a_fault_not_a_reward(pool):
    group = run_group("arith", 0, 4, CrashPolicy(), backend=pool, log=False)
    assert all(r.fault and r.fault.startswith("worker_crash") for r in group.rollouts)
    assert all(r.reward is None for r in group.rollouts) and group.trainable == []
    # the pool recovers for the next group
    assert run_group("arith", 0, 2, ScriptedPolicy("arith"), backend=pool, log=False
                     ).stats["faults"] == 0


def test_a_raising_policy_is_a_fault_inline():
    group = run_group("shop", 0, 2, RaisingPolicy(), backend=InlineBackend(), log=False)
    assert all("policy bug" in r.fault for r in group.rollouts)


def test_a_sandbox_timeout_is_a_fault_and_replay_skips_it():
    class LoopPolicy:
        def act(self, observations):
            return [Action("write textkit/count.py\nwhile True:\n    pass")
                    if o.startswith("Task:") else Action("submit") for o in observations]

    group = run_group("code", 0, 1, LoopPolicy(), backend="inline", run_id="loop",
                      options={"variant": "count", "cpu_s": 1, "wall_s": 3})
    rollout = group.rollouts[0]
    assert rollout.fault == "sandbox: timeout" and rollout.reward is None
    assert replay(read_rollouts("loop")[0]).ok


def test_model_policy_runs_in_lockstep_with_token_logprobs(tiny_lm, pool):
    from onthejob.model import SamplingParams

    policy = ModelPolicy(tiny_lm, SamplingParams(max_tokens=8, temperature=1.0, seed=0))
    group = run_group("shop", 1, 3, policy, backend=pool, max_steps=2, run_id="m1")
    assert group.stats["faults"] == 0
    for rollout in group.rollouts:
        assert len(rollout.actions) == 2
        for ids, logprobs in zip(rollout.token_ids, rollout.logprobs, strict=True):
            assert ids and len(ids) == len(logprobs) and all(lp <= 0 for lp in logprobs)
        assert rollout.prompt_ids[0][: 3] == policy.prompt_ids(rollout.observations[0])[:3]
    assert all(replay(r).ok for r in read_rollouts("m1"))  # without the model
    # The group's time is its rollouts' time, split into the model's share and the env's.
    for part in ("policy_s", "env_s"):
        assert group.stats[part] == pytest.approx(sum(getattr(r, part) for r in group.rollouts))


def test_gymnasium_wrapper_passes_the_env_checker():
    from gymnasium.utils.env_checker import check_env

    from onthejob.envs.gym_wrapper import GymEnv

    for name, options in (("arith", {"difficulty": 1}), ("shop", {})):
        env = GymEnv(name, max_episode_steps=20, **options)
        check_env(env, skip_render_check=True)
        obs, info = env.reset(seed=4)
        assert env.observation_space.contains(obs) and len(info["state_hash"]) == 64
        policy = ScriptedPolicy(name)
        total, terminated, truncated = 0.0, False, False
        while not (terminated or truncated):
            obs, reward, terminated, truncated, info = env.step(policy.act([obs])[0].text)
            total += reward
        assert total == 1.0 and terminated


def test_cli_lists_and_plays_environments(monkeypatch, capsys):
    import io

    assert cli_main(["envs", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("arith", "code", "shop"))

    from onthejob.envs.arith import generate_problem

    _, answer = generate_problem(3, 1)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"#### {answer}\n"))
    assert cli_main(["envs", "try", "arith", "--seed", "3", "--option", "difficulty=1"]) == 0
    assert "correct" in capsys.readouterr().out

    path, text = __import__("onthejob.envs.code_repos", fromlist=["SOLUTIONS"]).SOLUTIONS["count"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"write {path}\n{text}.\nsubmit\n"))
    assert cli_main(["envs", "try", "code", "--option", "variant=count"]) == 0
    out = capsys.readouterr().out
    assert "wrote textkit/count.py" in out and "reward 1.0" in out

    assert cli_main(["envs", "try", "nope"]) == 2
    assert "unknown environment" in capsys.readouterr().err
