"""Environment options and the Gymnasium view: an option a environment does not take is
refused with the valid ones listed; the env's own step limit is Gymnasium's `truncated`, not
`terminated`; env options like shop's `max_steps` pass through the wrapper; the built-in
environments are registered for `gymnasium.make`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest

from onthejob.cli import main as cli_main
from onthejob.envs import EnvError, make
from onthejob.envs.gym_wrapper import GymEnv, register_gymnasium
from onthejob.envs.policies import ScriptedPolicy


@pytest.mark.parametrize("name,typo,meant", [("arith", "difficuly", "difficulty"),
                                              ("shop", "max_step", "max_steps"),
                                              ("code", "varaint", "variant")])
def test_an_unknown_option_is_refused_with_the_valid_ones(name, typo, meant):
    with pytest.raises(EnvError) as refused:
        make(name, **{typo: 2})
    text = str(refused.value)
    assert f"unknown option {typo!r} (did you mean {meant!r}?)" in text
    assert f"environment {name!r}: its options are" in text and meant in text


def test_the_option_typo_is_refused_by_the_commands(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli_main(["envs", "try", "arith", "--option", "difficuly=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'difficuly' (did you mean 'difficulty'?)" in err
    assert cli_main(["grind", "--env", "arith", "--option", "difficuly=2", "--steps", "1"]) == 2
    assert "did you mean 'difficulty'" in capsys.readouterr().err


def test_known_options_still_make_and_fork():
    env = make("shop", max_steps=5, partial=True, start="review")
    env.reset(1)
    assert [e.options for e in env.fork(2)] == [env.options] * 2
    assert make("arith", difficulty=3).options == {"difficulty": 3}


@pytest.mark.parametrize("name,options,action", [("shop", {"max_steps": 3}, "click nowhere"),
                                                 ("code", {"max_steps": 2}, "ls")])
def test_the_envs_own_step_limit_is_truncated_not_terminated(name, options, action):
    env = GymEnv(name, **options)  # max_steps is the env's option, not the wrapper's
    assert env.env.max_steps == options["max_steps"]
    env.reset(seed=0)
    flags = [env.step(action)[2:4] for _ in range(options["max_steps"])]
    assert flags == [(False, False)] * (options["max_steps"] - 1) + [(False, True)]


def test_a_finished_task_is_terminated_and_the_wrappers_own_limit_truncates():
    env = GymEnv("shop")
    obs, _ = env.reset(seed=2)
    policy, terminated, truncated = ScriptedPolicy("shop"), False, False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, _ = env.step(policy.act([obs])[0].text)
    assert (terminated, truncated, reward) == (True, False, 1.0)
    env = GymEnv("shop", max_episode_steps=2)
    env.reset(seed=2)
    assert [env.step("click nowhere")[2:4] for _ in range(2)] == [(False, False), (False, True)]


def test_the_envs_are_registered_for_gymnasium_make():
    assert {"onthejob/arith-v1", "onthejob/code-v1", "onthejob/shop-v1"} <= set(gym.registry)
    env = gym.make("onthejob/shop-v1", max_steps=2)
    env.reset(seed=0)
    assert env.step("click nowhere")[2:4] == (False, False)
    assert env.step("click nowhere")[2:4] == (False, True)
    with pytest.raises(EnvError, match="did you mean 'difficulty'"):
        gym.make("onthejob/arith-v1", difficuly=1)
    assert register_gymnasium("arith") == "onthejob/arith-v1"  # twice is harmless


def test_gymnasium_make_finds_them_without_an_import_first():
    code = ("import gymnasium as gym\n"
            "env = gym.make('onthejob.envs.gym_wrapper:onthejob/arith-v1', difficulty=2)\n"
            "obs, info = env.reset(seed=1)\nprint(env.spec.id, len(info['state_hash']))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["onthejob/arith-v1", "64"]
