"""Policies: what acts in an environment. `act` is batched: one action per observation.

A policy decides from the current observation alone (every built-in observation carries
the task), so one policy object can serve many episodes at once. A policy that needs a
different random stream per rollout defines `spawn(index) -> Policy`; `run_group` calls it.

- `ScriptedPolicy(env)`: solves the built-in tasks by reading the observation (the `code`
  solver looks the task up in the repository templates' reference solutions). For tests
  and benchmarks.
- `RandomPolicy(env, seed)`: plausible but random actions in the env's action language.
- `ModelPolicy` (in `model_policy`): the language model.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from onthejob.envs.arith import parse_answer
from onthejob.envs.code_repos import SOLUTIONS, VARIANTS
from onthejob.envs.shop_world import CATEGORIES, COLORS, FIELDS


@dataclass
class Action:
    text: str
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


@runtime_checkable
class Policy(Protocol):
    def act(self, observations: list[str]) -> list[Action]: ...


# ---- arith ---------------------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("not an arithmetic expression")


def solve_arith(observation: str) -> str:
    problem = observation.split("Problem:", 1)[-1].strip()
    match = re.fullmatch(r"What is (.+)\?", problem)
    if match:
        return f"#### {_evaluate(ast.parse(match.group(1), mode='eval').body)}"
    total = 0
    for sentence in re.split(r"(?<=[.?])\s+", problem):
        if m := re.search(r" has (\d+) ", sentence):
            total = int(m.group(1))
        elif m := re.search(r"buys (\d+) more", sentence):
            total += int(m.group(1))
        elif m := re.search(r"gives away (\d+)", sentence):
            total -= int(m.group(1))
        elif m := re.search(r"gets (\d+) bags with (\d+)", sentence):
            total += int(m.group(1)) * int(m.group(2))
        elif "doubles" in sentence:
            total *= 2
    return f"#### {total}"


# ---- shop ----------------------------------------------------------------------------------
_TASK = re.compile(r"<task>Buy (\d+) of the cheapest (\w+) (\w+) under \$(\d+) and ship it to "
                   r"(.+?), (.+?), (.+?), (\d+) by (\w+) shipping; pay with card (\d+)\.</task>")
_ROW = re.compile(r'<a id="(p\d+)">[^<]*</a> color=(\w+) price=\$(\d+)\.(\d\d)')


def solve_shop(observation: str) -> str:
    task = _TASK.search(observation)
    if not task:
        return "click home"
    qty, color, category, limit, *address_and_rest = task.groups()
    name, street, city, zip_code, shipping, card = address_and_rest
    page = re.search(r'<page name="(\w+)">', observation).group(1)
    in_cart = int(re.search(r"Cart \((\d+)\)", observation).group(1))
    if page == "home":
        return f"search {color} {category}"
    if page == "results":
        if in_cart:
            return "click cart"
        rows = [(int(d) * 100 + int(c), pid) for pid, col, d, c in _ROW.findall(observation)
                if col == color and int(d) * 100 + int(c) < int(limit) * 100]
        return f"click {min(rows)[1]}" if rows else f"search {color} {category}"
    if page == "product":
        chosen = re.search(r'name="quantity" value="(\d)"', observation).group(1)
        if in_cart:
            return "click cart"
        return "click add-to-cart" if chosen == qty else f"select quantity {qty}"
    if page == "cart":
        return "click checkout"
    if page == "address":
        wanted = dict(zip(FIELDS[:4], (name, street, city, zip_code), strict=True))
        for field, value in re.findall(r'<input name="(\w+)" value="([^"]*)"/>', observation):
            if value != wanted[field]:
                return f"type {field} {wanted[field]}"
        return "click continue"
    if page == "shipping":
        chosen = re.search(r'name="shipping" value="(\w*)"', observation).group(1)
        return "click continue" if chosen == shipping else f"select shipping {shipping}"
    if page == "payment":
        chosen = re.search(r'name="card" value="(\d*)"', observation).group(1)
        return "click continue" if chosen == card else f"type card {card}"
    if page == "review":
        return "click place-order"
    return "click home"


# ---- code ----------------------------------------------------------------------------------
_CODE_KEYS = {description: key for key, (description, *_rest) in VARIANTS.items()}


def solve_code(observation: str) -> str:
    if observation.startswith("Task: "):
        key = _CODE_KEYS.get(observation.splitlines()[0][len("Task: "):])
        if key is None:
            return "submit"
        path, text = SOLUTIONS[key]
        return f"write {path}\n{text}"
    return "submit"


_SOLVERS = {"arith": solve_arith, "shop": solve_shop, "code": solve_code}


class ScriptedPolicy:
    """Solves the built-in environment `env` from its observations."""

    def __init__(self, env: str) -> None:
        if env not in _SOLVERS:
            raise ValueError(f"no scripted policy for {env!r}: there are {', '.join(_SOLVERS)}")
        self.env, self._solve = env, _SOLVERS[env]

    def act(self, observations: list[str]) -> list[Action]:
        return [Action(self._solve(o)) for o in observations]


class RandomPolicy:
    """Random actions in `env`'s action language, from its own seeded random stream."""

    def __init__(self, env: str, seed: int = 0) -> None:
        self.env, self.seed = env, seed
        self.rng = random.Random(f"random-policy-{env}-{seed}")

    def spawn(self, index: int) -> RandomPolicy:
        return RandomPolicy(self.env, self.seed * 100_003 + index)

    def act(self, observations: list[str]) -> list[Action]:
        return [Action(self._one(o)) for o in observations]

    def _one(self, observation: str) -> str:
        rng = self.rng
        if self.env == "arith":
            guess = parse_answer(observation.split("Problem:")[-1]) or 0
            return rng.choice([f"#### {rng.randint(0, 100)}", f"answer: {guess}", "", "no idea"])
        if self.env == "code":
            return rng.choice(["ls", "run tests", "read tests/__init__.py", "submit",
                               "write junk.py\nprint('hello')"])
        ids = re.findall(r'id="([\w-]+)"', observation)
        kind = rng.randrange(5)
        if kind == 0:
            return f"search {rng.choice(COLORS)} {rng.choice(CATEGORIES)}"
        if kind == 1 and ids:
            return f"click {rng.choice(ids)}"
        if kind == 2:
            return f"type {rng.choice(FIELDS)} {rng.choice(['4242424242424242', 'x', '12345'])}"
        if kind == 3:
            return rng.choice(["select quantity 2", "select shipping express", "click continue"])
        return rng.choice(["click cart", "click checkout", "click place-order", "hello"])
