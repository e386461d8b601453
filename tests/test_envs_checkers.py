"""The checkers: the scripted policy wins every built-in task; wrong, empty, random and
cheating answers lose."""

from __future__ import annotations

import pytest

from onthejob.envs import make
from onthejob.envs.arith import generate_problem, parse_answer
from onthejob.envs.code_repos import SOLUTIONS, TASK_KEYS, make_code_task
from onthejob.envs.policies import RandomPolicy, ScriptedPolicy, solve_shop
from onthejob.envs.shop import score_order
from onthejob.envs.shop_world import BY_ID, CATALOG, make_task


def episode(env, seed: int, policy, max_steps: int = 60) -> tuple[float, int]:
    observation, total = env.reset(seed), 0.0
    for step in range(1, max_steps + 1):
        result = env.step(policy.act([observation])[0].text)
        observation, total = result.observation, total + result.reward
        if result.done:
            return total, step
    return total, max_steps


@pytest.mark.parametrize("text, expected", [
    ("#### 42", 42), ("answer: 42", 42), ("The answer is 17.", 17), ("3 + 4 = 7", 7),
    ("it is 1,024", 1024), ("-5", -5), ("12.0", 12), ("2.5", None), ("no idea", None), ("", None),
    ("#### 8\nbut maybe 9", 8),
])
def test_arith_parses_answers(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize("difficulty", range(5))
def test_arith_scripted_wins_and_wrong_answers_lose(difficulty):
    scripted = ScriptedPolicy("arith")
    for seed in range(40):
        env = make("arith", difficulty=difficulty)
        assert episode(env, seed, scripted) == (1.0, 1)
        _, answer = generate_problem(seed, difficulty)
        for wrong in (f"#### {answer + 1}", "", "I do not know"):
            env.reset(seed)
            result = env.step(wrong)
            assert (result.reward, result.done) == (0.0, True)
            assert str(answer) in result.observation


def test_arith_easy_level_is_one_small_addition():
    question, answer = generate_problem(0, 0)
    assert question.startswith("What is ") and " + " in question and 2 <= answer <= 18


def test_shop_scripted_wins_random_loses():
    env = make("shop")
    wins = [episode(env, seed, ScriptedPolicy("shop")) for seed in range(60)]
    assert all(reward == 1.0 for reward, _ in wins)
    order = env.orders[-1]
    task = make_task(59)
    assert order[0] == ((task.pid, task.quantity),) and order[2] == task.shipping
    for seed in range(10):
        assert episode(env, seed, RandomPolicy("shop", seed))[0] == 0.0
        assert episode(env, seed, ScriptedPolicy("arith"), max_steps=70)[0] == 0.0


def test_shop_task_answer_is_the_unique_cheapest_match():
    for seed in range(200):
        task = make_task(seed)
        product = BY_ID[task.pid]
        same = [p for p in CATALOG if p.category == product.category and p.color == product.color]
        assert min(same, key=lambda p: p.price) == product
        assert f"cheapest {product.color} {product.category} under" in task.text


def _play_until_review(env, seed):
    observation = env.reset(seed)
    while '<page name="review">' not in observation:
        observation = env.step(solve_shop(observation)).observation
    return observation


def test_shop_checks_the_database_not_the_page():
    task = make_task(11)
    env = make("shop")
    _play_until_review(env, 11)
    # Change the shipping after the fact: the order must now be wrong.
    env.step("click home")
    env.step("click cart")
    env.step("click checkout")
    env.step("click continue")
    other = "standard" if task.shipping == "express" else "express"
    env.step(f"select shipping {other}")
    env.step("click continue")
    env.step("click continue")
    result = env.step("click place-order")
    assert result.done and result.reward == 0.0
    assert env.orders[-1][2] == other


def test_shop_partial_credit_counts_matching_parts():
    task = make_task(5)
    right = (((task.pid, task.quantity),), task.address, task.shipping, task.card)
    assert score_order(right, task) == (1.0, 1.0)
    wrong_ship = right[:2] + ("standard" if task.shipping == "express" else "express", task.card)
    assert score_order(wrong_ship, task) == (0.0, 0.75)
    env = make("shop", partial=True)
    _play_until_review(env, 5)
    assert env.step("click place-order").reward == 1.0


def test_shop_validates_forms_and_reports_errors():
    env = make("shop")
    env.reset(0)
    assert "no checkout to click on the home page" in env.step("click checkout").observation
    env.step("click cart")
    assert "the cart is empty" in env.step("click checkout").observation
    assert "unknown action" in env.step("dance").observation
    assert "no field" in env.step("type name Ada").observation


def test_shop_ends_when_out_of_steps():
    env = make("shop", max_steps=3)
    env.reset(0)
    assert not env.step("click cart").done
    assert not env.step("click home").done
    result = env.step("click cart")
    assert result.done and result.reward == 0.0 and "out of steps" in result.observation


@pytest.mark.parametrize("variant", TASK_KEYS)
def test_code_scripted_wins_every_variant(variant):
    env = make("code", variant=variant)
    assert episode(env, 3, ScriptedPolicy("code")) == (1.0, 2)


def test_code_unchanged_repo_or_cheating_on_tests_loses():
    env = make("code", variant="median")
    observation = env.reset(1)
    assert "Fix the bug in `median`" in observation
    result = env.step("run tests")
    assert "FAIL test_even" in result.observation and result.reward == 0.0
    # Rewriting the tests to pass does not help: grading restores them.
    env.step("write tests/test_median.py\ndef test_even():\n    pass")
    assert "PASS test_even" in env.step("run tests").observation
    result = env.step("submit")
    assert result.done and result.reward == 0.0


def test_code_test_output_is_deterministic_across_seeds_and_runs():
    task = make_code_task(2, "merge")
    env = make("code", variant="merge")
    env.reset(2)
    first = env.step("run tests").observation
    env.reset(2)
    assert env.step("run tests").observation == first
    assert "FAIL test_touching" in first and "passed 2/3" in first
    path, text = SOLUTIONS["merge"]
    env.step(f"write {path}\n{text}")
    assert env.step("submit").reward == 1.0
    assert dict(task.files)[path] != text


def test_code_sandbox_fault_is_not_a_reward():
    env = make("code", variant="count", cpu_s=1, wall_s=3)
    env.reset(0)
    env.step("write textkit/count.py\ndef word_counts(text):\n    while True:\n        pass")
    result = env.step("submit")
    assert result.done and result.info["fault"] == "timeout"


def test_code_refuses_paths_outside_the_repo():
    env = make("code")
    env.reset(0)
    assert "must be a relative path" in env.step("write /etc/x.py\nx=1").observation
    assert "must be a relative path" in env.step("write ../x.py\nx=1").observation
