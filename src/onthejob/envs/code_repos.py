"""Task repositories for the `code` environment: small Python packages, each with a missing
function or a bug, their unit tests, and (for the scripted policy) a reference solution.

Tests are plain functions named test_* in tests/test_*.py; `RUNNER` runs them and prints one
deterministic line per test (no timings, no addresses, no paths), so test output is part of
a replayable observation.
"""

from __future__ import annotations

import random
from typing import NamedTuple


class CodeTask(NamedTuple):
    key: str
    description: str
    files: tuple[tuple[str, str], ...]  # (path, text), sorted
    solution: tuple[str, str]  # (path, text) that passes the tests


RUNNER = '''\
import importlib, io, pathlib, re, sys, contextlib
sys.path.insert(0, ".")
results = []
for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    name = "tests." + path.stem
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module = importlib.import_module(name)
    except BaseException as exc:
        results.append(("ERROR", path.stem, exc))
        continue
    for attr in sorted(dir(module)):
        if attr.startswith("test_") and callable(getattr(module, attr)):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    getattr(module, attr)()
                results.append(("PASS", attr, None))
            except BaseException as exc:
                results.append(("FAIL", attr, exc))
passed = 0
for status, name, exc in results:
    passed += status == "PASS"
    detail = "" if exc is None else ": " + type(exc).__name__ + ": " + str(exc)
    detail = re.sub(r"0x[0-9a-f]+", "0x?", detail.replace(str(pathlib.Path.cwd()), "."))
    print(status, name + detail[:200])
print(f"passed {passed}/{len(results)}")
sys.exit(0 if results and passed == len(results) else 1)
'''

_SLUG_STUB = '''\
def slugify(title):
    """'Hello, World!' -> 'hello-world': lowercase words of letters and digits joined by '-'."""
    raise NotImplementedError
'''
_SLUG_FIX = '''\
import re


def slugify(title):
    """'Hello, World!' -> 'hello-world': lowercase words of letters and digits joined by '-'."""
    return "-".join(re.findall(r"[a-z0-9]+", title.lower()))
'''
_MEDIAN_BUG = '''\
def median(values):
    """The median of a non-empty list of numbers."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
'''
_MEDIAN_FIX = '''\
def median(values):
    """The median of a non-empty list of numbers."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
'''
_MERGE_BUG = '''\
def merge(intervals):
    """Merge overlapping or touching [start, end] intervals; return them sorted."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged
'''
_MERGE_FIX = _MERGE_BUG.replace("start < merged[-1][1]", "start <= merged[-1][1]")
_ROMAN_STUB = '''\
def to_roman(number):
    """1 <= number <= 3999 as a Roman numeral, e.g. 1994 -> 'MCMXCIV'."""
    raise NotImplementedError
'''
_ROMAN_FIX = '''\
PAIRS = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
         (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]


def to_roman(number):
    """1 <= number <= 3999 as a Roman numeral, e.g. 1994 -> 'MCMXCIV'."""
    out = ""
    for value, letters in PAIRS:
        while number >= value:
            out += letters
            number -= value
    return out
'''
_COUNT_BUG = '''\
def word_counts(text):
    """How often each word occurs, ignoring case and the punctuation .,!?"""
    counts = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return counts
'''
_COUNT_FIX = '''\
def word_counts(text):
    """How often each word occurs, ignoring case and the punctuation .,!?"""
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,!?")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return counts
'''


def _roman(n: int) -> str:
    pairs = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
             (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for value, letters in pairs:
        while n >= value:
            out, n = out + letters, n - value
    return out


def _tests(rng: random.Random, key: str) -> str:
    """A test module; the seed varies the concrete cases."""
    if key == "slugify":
        words = rng.sample(["Alpha", "beta", "Gamma", "delta", "42", "Omega"], 3)
        title, slug = "  " + ", ".join(words) + "!", "-".join(w.lower() for w in words)
        return ("from textkit.slug import slugify\n\n\ndef test_simple():\n"
                "    assert slugify('Hello, World!') == 'hello-world'\n\n\n"
                f"def test_words():\n    assert slugify({title!r}) == {slug!r}\n\n\n"
                "def test_empty():\n    assert slugify('!!') == ''\n")
    if key == "median":
        a, b, c, d = sorted(rng.sample(range(1, 60), 4))
        return ("from statkit.center import median\n\n\ndef test_odd():\n"
                f"    assert median([{c}, {a}, {b}]) == {b}\n\n\ndef test_even():\n"
                f"    assert median([{d}, {a}, {c}, {b}]) == {(b + c) / 2}\n")
    if key == "merge":
        a = rng.randint(0, 5)
        return ("from spans.merge import merge\n\n\ndef test_overlap():\n"
                f"    assert merge([[{a + 4}, {a + 9}], [{a}, {a + 5}]]) == [[{a}, {a + 9}]]\n\n\n"
                f"def test_touching():\n    assert merge([[{a}, {a + 2}], [{a + 2}, {a + 3}]]) == "
                f"[[{a}, {a + 3}]]\n\n\ndef test_apart():\n"
                f"    assert merge([[{a}, {a + 1}], [{a + 3}, {a + 4}]]) == [[{a}, {a + 1}], [{a + 3}, {a + 4}]]\n")
    if key == "roman":
        n = rng.randint(1, 3999)
        return ("from numerals.roman import to_roman\n\n\ndef test_known():\n"
                "    assert to_roman(1994) == 'MCMXCIV'\n    assert to_roman(4) == 'IV'\n\n\n"
                f"def test_seeded():\n    assert to_roman({n}) == {_roman(n)!r}\n")
    word = rng.choice(["apple", "river", "stone", "cloud"])
    return ("from textkit.count import word_counts\n\n\ndef test_case_and_punctuation():\n"
            f"    counts = word_counts('{word.title()} {word}, {word}! pear.')\n"
            f"    assert counts == {{{word!r}: 3, 'pear': 1}}\n")


VARIANTS = {
    "slugify": ("Implement `slugify` in textkit/slug.py so that the tests pass.",
                "textkit/slug.py", _SLUG_STUB, _SLUG_FIX),
    "median": ("Fix the bug in `median` (statkit/center.py): even-length lists are wrong.",
               "statkit/center.py", _MEDIAN_BUG, _MEDIAN_FIX),
    "merge": ("Fix the bug in `merge` (spans/merge.py): touching intervals are not merged.",
              "spans/merge.py", _MERGE_BUG, _MERGE_FIX),
    "roman": ("Implement `to_roman` in numerals/roman.py so that the tests pass.",
              "numerals/roman.py", _ROMAN_STUB, _ROMAN_FIX),
    "count": ("Fix `word_counts` in textkit/count.py: it must ignore case and punctuation.",
              "textkit/count.py", _COUNT_BUG, _COUNT_FIX),
}
TASK_KEYS = tuple(VARIANTS)
SOLUTIONS = {key: (v[1], v[3]) for key, v in VARIANTS.items()}


def make_code_task(seed: int, variant: str | None = None) -> CodeTask:
    rng = random.Random(f"code-{seed}")
    key = variant or rng.choice(TASK_KEYS)
    description, path, broken, fixed = VARIANTS[key]
    package = path.split("/")[0]
    test_path = f"tests/test_{key}.py"
    files = {path: broken, f"{package}/__init__.py": "", "tests/__init__.py": "",
             test_path: _tests(rng, key)}
    return CodeTask(key, description, tuple(sorted(files.items())), (path, fixed))
