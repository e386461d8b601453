"""`arith`: generated arithmetic and word problems with exact integer answers.

Difficulty 0 is one addition of one-digit numbers (a 135M model sometimes gets it, so RL has
a curve to climb); 1 adds subtraction and small products; 2 is two operations with
precedence; 3 is a three-to-four step word problem; 4 a longer one with bigger numbers.
The action is the answer text: "#### 42" or "answer: 42" win, else the last number in it.
One action per episode; reward 1 for the exact answer, else 0.
"""

from __future__ import annotations

import random
import re

from onthejob.envs.base import Env, EnvError, StepResult

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards")
INSTRUCTION = "Solve the problem. Give the final answer as a number on the last line, like: #### 42"

_MARKED = re.compile(r"(?:####|answer\s*(?:is)?\s*[:=]?)\s*(-?\d[\d,]*(?:\.\d+)?)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_answer(text: str) -> int | None:
    """The integer the text answers, or None. Marked answers win over the last number."""
    found = _MARKED.findall(text) or _NUMBER.findall(text)
    if not found:
        return None
    value = float(found[-1].replace(",", ""))
    return int(value) if value == int(value) else None


def _expression(rng: random.Random, difficulty: int) -> tuple[str, int]:
    if difficulty == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"What is {a} + {b}?", a + b
    if difficulty == 1:
        kind = rng.choice("+-*")
        if kind == "*":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            return f"What is {a} * {b}?", a * b
        a, b = rng.randint(10, 50), rng.randint(1, 20)
        return (f"What is {a} + {b}?", a + b) if kind == "+" else (f"What is {a} - {b}?", a - b)
    a, b, c = rng.randint(2, 30), rng.randint(2, 12), rng.randint(2, 12)
    form = rng.randrange(3)
    if form == 0:
        return f"What is {a} + {b} * {c}?", a + b * c
    if form == 1:
        return f"What is ({a} + {b}) * {c}?", (a + b) * c
    return f"What is {a} * {b} - {c}?", a * b - c


def _word_problem(rng: random.Random, steps: int, scale: int) -> tuple[str, int]:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(5, 10 * scale)
    lines = [f"{name} has {total} {items}."]
    for _ in range(steps):
        move = rng.randrange(4)
        if move == 0:
            k = rng.randint(2, 5 * scale)
            lines.append(f"Then {name} buys {k} more.")
            total += k
        elif move == 1 and total > 1:
            k = rng.randint(1, total - 1)
            lines.append(f"Then {name} gives away {k}.")
            total -= k
        elif move == 2:
            bags, each = rng.randint(2, 4 + scale), rng.randint(2, 6)
            lines.append(f"Then {name} gets {bags} bags with {each} {items} in each.")
            total += bags * each
        else:
            lines.append(f"Then {name} doubles the number of {items}.")
            total *= 2
    lines.append(f"How many {items} does {name} have now?")
    return " ".join(lines), total


def generate_problem(seed: int, difficulty: int) -> tuple[str, int]:
    rng = random.Random(f"arith-{difficulty}-{seed}")
    if difficulty <= 2:
        return _expression(rng, difficulty)
    return _word_problem(rng, steps=difficulty, scale=difficulty - 1)


class ArithEnv(Env):
    name = "arith"
    version = "1"

    def __init__(self, difficulty: int = 0) -> None:
        if difficulty not in range(5):
            raise EnvError(f"difficulty must be 0..4, not {difficulty!r}")
        super().__init__(difficulty=difficulty)
        self.difficulty = difficulty
        self._state: tuple | None = None

    def reset(self, seed: int) -> str:
        question, answer = generate_problem(seed, self.difficulty)
        observation = f"{INSTRUCTION}\n\nProblem: {question}"
        self._state = (seed, question, answer, False, observation)
        return observation

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise EnvError("call reset(seed) before step()")
        seed, question, answer, done, _ = self._state
        if done:
            raise EnvError("the episode is over: call reset(seed)")
        given = parse_answer(action)
        reward = 1.0 if given == answer else 0.0
        if given is None:
            observation = f"wrong: no number found; the answer is {answer}"
        elif reward:
            observation = f"correct: {answer}"
        else:
            observation = f"wrong: you said {given}; the answer is {answer}"
        self._state = (seed, question, answer, True, observation)
        return StepResult(observation, reward, True, {"answer": answer, "given": given})

    def snapshot(self) -> tuple | None:
        return self._state

    def restore(self, state: tuple | None) -> None:
        self._state = state
