"""A team's conventions as data (data/conventions.json), and the programs that check a reply
for one: regexes and parsing of the reply text alone, no model judge.

A convention has an id and a kind (format, units, length, tone, vocabulary, policy, workflow),
the words a memory layer would keep (`rule`), how a user states it up front (`statements`) or
as a correction after a wrong answer (`corrections`), 32 prompts it applies to fixed into
`train` and `eval` halves, and a checker spec: a list of conditions, all of which must hold.

Conditions (case-insensitive unless said otherwise):
  starts_with TEXT            the reply (less leading spaces, quotes and emphasis) starts with it
  last_line_contains TEXT     its last non-empty line contains it
  contains TEXT               it contains it
  contains_at_least {texts, n}  at least n of the texts
  matches RE / not_matches RE  re.search with IGNORECASE and MULTILINE (scope a part with (?-i:...))
  bullets N                   at least N lines start with '- ', '* ' or '• ', and they are at
                              least half of the non-empty lines
  max_words N / max_sentences N
  lowercase true              letters, none of them upper case
  language {code, share}      at least `share` of its words are common words of that language
                              (fr, es, de)
  labels [A, B, ...]          a line starting with each label and a colon ('Owner:', '**Owner:**')
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from onthejob.learn.practice import assert_unseen

KINDS = ("format", "units", "length", "tone", "vocabulary", "policy", "workflow")
KEEP_AT = 0.5  # the screen keeps a convention the model follows this often with it in context

# Common function words of each language (none of them a common English word).
_LANGUAGES = {
    "fr": frozenset("""le la les un une des et est sont pour vous nous je tu il elle ils elles
de du au aux dans avec pas sur ce cette ces qui que votre vos notre nos leur leurs mais très
être avoir fait peut bonjour merci aussi comme plus sans entre chez voici oui non ou où
l d j c qu n s m""".split()),
    "es": frozenset("""el la los las un una unos unas y es son para por con de del en que se
lo al su sus muy más pero como este esta estos estas también puede hay está están nuestro
nuestra nuestros usted ustedes hola gracias sí porque cuando todo todos""".split()),
    "de": frozenset("""der die das und ist sind ein eine einen einem einer für mit nicht auf
zu im den dem des von wir sie ich du es auch oder aber wie sehr mehr kann können haben hat
werden wird hallo danke bitte ihr ihre unser unsere sich noch nach bei dass""".split()),
}
_FLAGS = re.IGNORECASE | re.MULTILINE


@dataclass
class Convention:
    id: str
    kind: str
    rule: str
    statements: list[str]
    corrections: list[str]
    check: list[dict]
    train: list[str]
    eval: list[str]
    max_tokens: int | None = None  # reply budget where the convention needs more than the default
    screen: dict = field(default_factory=dict)  # the screen's figures, where measured

    def follows(self, reply: str) -> bool:
        return not failed(self.check, reply)


def _lines(reply: str) -> list[str]:
    return [line.strip() for line in reply.splitlines() if line.strip()]


def _words(reply: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", reply.lower())


def _sentences(reply: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", reply.strip()) if s.strip()]


def _label(label: str) -> re.Pattern:
    return re.compile(rf"^[\s>*#•-]*[*_]*{re.escape(label)}[*_]*\s*:", _FLAGS)


def _bullets(reply: str, n: int) -> bool:
    lines = _lines(reply)
    marked = [line for line in lines if re.match(r"[-*•]\s+\S", line)]
    return len(marked) >= n and 2 * len(marked) >= len(lines)


def _language(reply: str, code: str, share: float) -> bool:
    words = _words(reply)
    return bool(words) and sum(w in _LANGUAGES[code] for w in words) >= share * len(words)


_CONDITIONS = {
    "starts_with": lambda r, v: r.lstrip(" \t\n\"'*_").lower().startswith(v.lower()),
    "last_line_contains": lambda r, v: bool(_lines(r)) and v.lower() in _lines(r)[-1].lower(),
    "contains": lambda r, v: v.lower() in r.lower(),
    "contains_at_least": lambda r, v: sum(t.lower() in r.lower() for t in v["texts"]) >= v["n"],
    "matches": lambda r, v: re.search(v, r, _FLAGS) is not None,
    "not_matches": lambda r, v: re.search(v, r, _FLAGS) is None,
    "bullets": lambda r, v: _bullets(r, v),
    "max_words": lambda r, v: 0 < len(r.split()) <= v,
    "max_sentences": lambda r, v: 0 < len(_sentences(r)) <= v,
    "lowercase": lambda r, v: any(c.isalpha() for c in r) and not any(c.isupper() for c in r),
    "language": lambda r, v: _language(r, v["code"], v["share"]),
    "labels": lambda r, v: all(_label(x).search(r) for x in v),
}


def failed(check: Sequence[dict], reply: str) -> list[str]:
    """The names of the conditions of `check` that `reply` does not meet ([] = it follows).
    An empty reply follows nothing."""
    if not reply.strip():
        return ["empty"]
    out = []
    for condition in check:
        ((name, value),) = condition.items()
        if not _CONDITIONS[name](reply, value):
            out.append(name)
    return out


def _validate(check: Sequence[dict], where: str) -> None:
    if not check:
        raise ValueError(f"{where}: a convention needs at least one condition")
    for condition in check:
        if len(condition) != 1 or next(iter(condition)) not in _CONDITIONS:
            raise ValueError(f"{where}: unknown condition {condition!r}; choose from "
                             f"{', '.join(_CONDITIONS)}")
        name, value = next(iter(condition.items()))
        if name in ("matches", "not_matches"):
            re.compile(value)
        if name == "language" and value.get("code") not in _LANGUAGES:
            raise ValueError(f"{where}: language must be one of {', '.join(_LANGUAGES)}")


def data_path() -> Path:
    return Path(str(resources.files("onthejob").joinpath("data/conventions.json")))


def load(path: str | Path | None = None, kept_only: bool = True) -> list[Convention]:
    """The conventions of the data file (the package's by default); `kept_only`: those the
    screen kept (all of them where no screen was recorded). Checks the file: known kinds and
    conditions, train and eval disjoint, and no eval prompt anywhere in any train half."""
    doc = json.loads(Path(path or data_path()).read_text())
    screen = doc.get("screen", {}).get("conventions", {})
    out = []
    for row in doc["conventions"]:
        c = Convention(**{k: v for k, v in row.items() if k != "screen"},
                       screen=screen.get(row["id"], {}))
        if c.kind not in KINDS:
            raise ValueError(f"{c.id}: unknown kind {c.kind!r}; choose from {', '.join(KINDS)}")
        _validate(c.check, c.id)
        if not c.statements or not c.corrections or not c.train or not c.eval:
            raise ValueError(f"{c.id}: statements, corrections, train and eval must not be empty")
        out.append(c)
    if len({c.id for c in out}) != len(out):
        raise ValueError("two conventions share an id")
    # Disjoint by construction: no evaluation prompt is (inside) any training prompt of any
    # convention, so one tenant may learn several without training on another's test.
    assert_unseen([p for c in out for p in c.eval], [p for c in out for p in c.train])
    if kept_only and screen:
        out = [c for c in out if c.screen.get("kept", True)]
    return out


def by_ids(conventions: Sequence[Convention], ids: Sequence[str]) -> list[Convention]:
    known = {c.id: c for c in conventions}
    missing = [i for i in ids if i not in known]
    if missing:
        raise ValueError(f"unknown or dropped conventions {missing}; known: {', '.join(known)}")
    return [known[i] for i in ids]
