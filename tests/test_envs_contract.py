"""The environment contract: determinism, snapshot/restore/fork, registry and entry points."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onthejob.envs import Env, EnvError, StepResult, list_envs, make
from onthejob.envs import registry as registry_module
from onthejob.envs.code_repos import SOLUTIONS

SHOP_WORDS = [
    "search blue kettle", "search red mug", "search lamp", "click p04", "click p02",
    "click p13", "click add-to-cart", "click cart", "click checkout", "click home",
    "click continue", "click place-order", "click remove-p04", "select quantity 2",
    "select shipping express", "select shipping standard", "type name Ada Lovelace",
    "type street 12 Elm Street", "type city Springfield", "type zip 12345",
    "type card 4242424242424242", "type card 1234", "nonsense",
]
CODE_WORDS = ["ls", "read textkit/count.py", "read nothing.py", "run tests", "submit", "hello",
              "write textkit/count.py\ndef word_counts(text):\n    return {}",
              "write ../escape.py\nx = 1", "write " + "\n".join(SOLUTIONS["count"])]
ARITH_WORDS = ["#### 7", "answer: 12", "I think 5", "", "1,024", "-3", "no idea"]
VOCAB = {"shop": SHOP_WORDS, "code": CODE_WORDS, "arith": ARITH_WORDS}
OPTIONS = {"shop": {}, "code": {"variant": "count"}, "arith": {"difficulty": 3}}
# The code env runs a sandboxed process per test run: fewer, shorter examples.
BUDGET = {"shop": (60, 40), "arith": (60, 3), "code": (12, 5)}


def actions_for(env: str):
    words = st.sampled_from(VOCAB[env])
    free = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
    return st.lists(st.one_of(words, words, free), max_size=BUDGET[env][1])


def play(env_name: str, seed: int, actions: list[str]) -> list[tuple]:
    """Every observable of an episode: observations, rewards, dones and state hashes."""
    env = make(env_name, **OPTIONS[env_name])
    trace = [(env.reset(seed), env.state_hash())]
    for action in actions:
        result = env.step(action)
        trace.append((result.observation, result.reward, result.done, env.state_hash()))
        if result.done:
            break
    return trace


def continue_from(env: Env, actions: list[str]) -> list[tuple]:
    trace = []
    for action in actions:
        result = env.step(action)
        trace.append((result.observation, result.reward, result.done, env.state_hash()))
        if result.done:
            break
    return trace


@pytest.mark.parametrize("env_name", ["arith", "shop", "code"])
def test_replay_is_byte_exact_and_snapshots_fork_and_restore(env_name):
    examples, _ = BUDGET[env_name]

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(seed=st.integers(0, 10**6), actions=actions_for(env_name), data=st.data())
    def check(seed, actions, data):
        first = play(env_name, seed, actions)
        assert play(env_name, seed, actions) == first  # (name, version, seed, actions) -> bytes
        steps_done = len(first) - 1
        cut = data.draw(st.integers(0, steps_done))
        env = make(env_name, **OPTIONS[env_name])
        env.reset(seed)
        prefix_trace = continue_from(env, actions[:cut])
        assert prefix_trace == first[1:cut + 1]
        state, state_hash = env.snapshot(), env.state_hash()
        rest = actions[cut:steps_done]
        tail = continue_from(env, rest)
        assert tail == first[cut + 1:]
        env.restore(state)  # back in time: the same future again
        assert env.state_hash() == state_hash
        assert continue_from(env, rest) == tail
        env.restore(state)
        for copy in env.fork(2):  # forks are independent copies of the current state
            assert copy.state_hash() == state_hash
            assert continue_from(copy, rest) == tail
        assert env.state_hash() == state_hash

    check()


def test_state_hash_tells_states_apart_and_is_canonical():
    a, b = make("shop"), make("shop")
    assert a.reset(3) == b.reset(3) and a.state_hash() == b.state_hash()
    a.step("search blue kettle")
    assert a.state_hash() != b.state_hash()
    assert len(a.state_hash()) == 64
    b.reset(4)
    c = make("shop")
    c.reset(3)
    assert c.state_hash() != b.state_hash()  # the seed is part of the state
    assert make("shop", partial=True).state_hash() != make("shop").state_hash()  # options too


def test_step_before_reset_and_after_done_are_errors():
    env = make("arith")
    with pytest.raises(EnvError, match="reset"):
        env.step("1")
    env.reset(0)
    assert env.step("#### 1").done
    with pytest.raises(EnvError, match="over"):
        env.step("#### 1")


def test_registry_lists_builtins_and_explains_unknown_names():
    assert {"arith", "code", "shop"} <= set(list_envs())
    with pytest.raises(EnvError, match="unknown environment 'nope'.*arith"):
        make("nope")
    with pytest.raises(EnvError, match="difficulty"):
        make("arith", difficulty=9)


class CountdownEnv(Env):
    """A whole new environment in a few lines: say the number, then one less, down to 0."""

    name, version = "countdown", "1"

    def reset(self, seed: int) -> str:
        self.n = seed % 5 + 1
        return f"say {self.n}"

    def step(self, action: str) -> StepResult:
        ok = action.strip() == str(self.n)
        self.n = self.n - 1 if ok else self.n
        return StepResult(f"say {self.n}", float(ok and self.n == 0), self.n == 0)

    def snapshot(self) -> int:
        return self.n

    def restore(self, state: int) -> None:
        self.n = state


def test_register_a_new_environment_at_run_time(register_env):
    register_env("countdown", CountdownEnv)
    assert "countdown" in list_envs()
    env = make("countdown")
    assert env.reset(1) == "say 2"
    assert env.step("2").observation == "say 1"
    result = env.step("1")
    assert (result.reward, result.done) == (1.0, True)
    fork = env.fork(1)[0]
    assert fork.state_hash() == env.state_hash()


def test_environments_from_entry_points_are_discovered(monkeypatch):
    class FakeEntryPoint:
        name, value = "countdown-ep", "test_envs_contract:CountdownEnv"

    def fake_entry_points(group):
        assert group == "onthejob.envs"
        return [FakeEntryPoint()]

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry_module, "_discovered", False)
    monkeypatch.setattr(registry_module, "_registry", {})
    assert "countdown-ep" in list_envs()
    assert make("countdown-ep").reset(0) == "say 1"


def test_registered_test_envs_are_removed_afterwards():
    # The fixture above removed what the earlier tests registered (run in file order).
    assert not {"countdown", "broken"} & set(list_envs())


def test_a_factory_that_returns_no_env_is_refused(register_env):
    register_env("broken", lambda **kw: object())
    with pytest.raises(EnvError, match="not an Env"):
        make("broken")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(0, 15),
       tail=st.lists(st.sampled_from(SHOP_WORDS), max_size=8))
def test_shop_deep_states_replay_and_restore(seed, k, tail):
    """Scripted steps reach the checkout pages; random actions from there replay exactly."""
    from onthejob.envs.policies import solve_shop

    def run() -> tuple[list, object, object, bool]:
        env = make("shop")
        observation, trace = env.reset(seed), []
        for _ in range(k):
            result = env.step(solve_shop(observation))
            observation = result.observation
            trace.append((observation, result.reward, result.done, env.state_hash()))
            if result.done:
                assert result.reward == 1.0
                return trace, env, env.snapshot(), True
        state = env.snapshot()
        trace += continue_from(env, tail)
        return trace, env, state, False

    first, env, state, finished = run()
    assert run()[0] == first
    if not finished:
        env.restore(state)
        assert continue_from(env, tail) == first[k:]
