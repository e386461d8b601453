"""Dreamed tasks: the model with the session in front of it writes practice tasks about
what it saw: a question, the expected answer, and optionally a check (a Python expression
over `answer`, run only in the sandbox).

A 135M model does not follow free-form instructions (DESIGN.md), so every writer is a
few-shot completion, one sentence at a time. Two styles (`style`):

- "span" (the default): the answer comes first and verbatim from the session: candidate
  answer spans (numbers and dates, capitalized names, quoted phrases) are picked out of
  each sentence by rules, and the model only writes the question for that answer on one
  line (stop at the newline):

      Sentence: The Eiffel Tower was completed in 1889 for the World's Fair in Paris.
      Answer: 1889
      Question: When was the Eiffel Tower completed?

  The question's first words are given by the answer's kind (answer-typed prompts: "When"
  for a year or date, "How many" for a number, "Who" for a person's name, "What" else), so
  the model writes a question that asks for that answer rather than another fact of the
  sentence. Long sentences are cut to a window of words around the answer. A task whose
  question does not parse is retried (`attempts`: the first greedy, the others sampled),
  and only the questions are retried, so a retry is cheap.
- "rule" (an ablation: no model writing): every answer span gets the rule-made question
  below, so the gate and training can be measured on questions the model did not write.
- "qa" (the first writer): the session's material, then "Sentence: ... / Question:", and
  the model writes the question *and* an "Answer:" line (and a "Check:" line with
  checker="program").

Deterministic fallbacks, for an answer span whose model-written question did not parse after
every attempt: `fallback="rule"` (the default) turns the sentence itself into a question by
putting a question phrase in place of the span ("The tower was completed in what year?",
source "rule"); `fallback="cloze"` blanks the span out ("Fill in the blank ...", source
"cloze"). Both are rule-made: labeled, counted apart from the model's tasks, and never
counted in the parse rate.

Parsing is strict and every failure (every attempt) is kept with its reason, so the parse
rate is measured.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from onthejob.learn.evaluate import normalize
from onthejob.learn.probes import sentences
from onthejob.learn.spans import (
    answer_spans,
    question_lead,
    rule_question,
    span_prompt,
    span_question_problem,
    split_sentences,
    window,
)
from onthejob.model import LoadedModel, SamplingParams, generate

CHECKERS = ("match", "program")
STYLES = ("span", "qa", "rule")
FALLBACKS = ("rule", "cloze", "none")
RULE_SOURCES = ("rule", "cloze")  # tasks made by rules, not written by the model

_EXAMPLES = (
    ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
     "When was the Eiffel Tower completed?", "1889", '"1889" in answer'),
    ("Marie Curie won the Nobel Prize in Chemistry in 1911 for discovering radium.",
     "What did Marie Curie discover?", "radium", '"radium" in answer.lower()'),
    ("The Amazon River flows through Brazil, Peru and Colombia.",
     "Which country does the Amazon River flow through first?", "Brazil",
     '"brazil" in answer.lower()'),
)

# Answer-first examples: (sentence, answer span, question). Each kind of span the rules pick
# (a year, a person, a place, a number, an organization) is shown once.


@dataclass
class DreamTask:
    """One dreamed task. `checker` is "match" (normalized containment, else token F1 against
    `answers`) or "program" (`program` is a Python expression over `answer`). `source` says
    who wrote it: "model" (question and answer), "span" (the model's question for an answer
    span picked from the session), "rule" (a question made from the sentence by rule) or
    "cloze" (a fill-in-the-blank made from the sentence)."""

    id: str
    question: str
    answers: list[str]
    checker: str = "match"
    program: str = ""
    sentence: str = ""
    raw: str = ""  # what the model wrote, kept for `dream show`
    problem: str = ""  # why it was not parsed into a usable task ("" when it was)
    source: str = "model"
    attempt: int = 0  # 0: the greedy attempt; 1, 2, ...: sampled retries

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DreamTask:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class DreamWriting:
    tasks: list[DreamTask]  # parsed and usable (the model's and the rule-made fallbacks)
    dropped: list[DreamTask] = field(default_factory=list)  # every failed attempt, `problem` set
    tokens: int = 0  # prompt + generated tokens spent writing
    units: int = 0  # sentences (or answer spans) a task was asked for
    no_span: list[str] = field(default_factory=list)  # sentences without an answer span ("span")

    @property
    def model_tasks(self) -> list[DreamTask]:
        return [t for t in self.tasks if t.source not in RULE_SOURCES]

    @property
    def rule_tasks(self) -> list[DreamTask]:
        """Tasks made by rules (the "rule" style, or the rule and cloze fallbacks)."""
        return [t for t in self.tasks if t.source in RULE_SOURCES]

    @property
    def written(self) -> int:
        """Model-written attempts (each parsed or dropped); rule-made tasks are not counted."""
        return len(self.model_tasks) + len(self.dropped)

    @property
    def parse_rate(self) -> float:
        """Share of the model's attempts that parsed into a usable task (fallbacks excluded)."""
        return len(self.model_tasks) / max(self.written, 1)

    def counts(self) -> dict:
        first = [t for t in self.model_tasks if t.attempt == 0]
        return {"units": self.units, "written": self.written, "parsed": len(self.model_tasks),
                "parsed_first_attempt": len(first), "by_rule": len(self.rule_tasks),
                "usable": len(self.tasks), "no_span": len(self.no_span),
                "parse_rate": self.parse_rate}


def few_shot(checker: str = "match") -> str:
    blocks = []
    for sentence, question, answer, check in _EXAMPLES:
        block = f"Sentence: {sentence}\nQuestion: {question}\nAnswer: {answer}\n"
        if checker == "program":
            block += f"Check: {check}\n"
        blocks.append(block)
    return "\n".join(blocks) + "\n"


def writer_prompt(material: str, sentence: str, title: str = "", checker: str = "match") -> str:
    """The "qa" writer: the session's material, the few-shot examples, then the sentence."""
    head = f"Notes about {title}:\n" if title else "Notes:\n"
    return (f"{head}{material.strip()}\n\nQuiz questions about single sentences, each answered "
            f"by a few words of the sentence.\n\n{few_shot(checker)}Sentence: {sentence}\nQuestion:")


def task_id(question: str, answer: str) -> str:
    return hashlib.sha256(f"{question}\n{answer}".encode()).hexdigest()[:10]


def parse_task(completion: str, sentence: str, material: str, checker: str = "match") -> DreamTask:
    """A "qa" task from the text the model wrote after "Question:"; `problem` says what is
    wrong."""
    text = completion.split("\n\n")[0].split("Sentence:")[0]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    question = lines[0] if lines else ""
    fields = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("answer", "check") and key.strip().lower() not in fields:
            fields[key.strip().lower()] = value.strip()
    answer = fields.get("answer", "").strip().rstrip(".")
    task = DreamTask(task_id(question, answer), question, [answer] if answer else [], checker,
                     sentence=sentence, raw=completion)
    norm_answer = normalize(answer)
    if not question.endswith("?") or len(question.split()) < 3:
        task.problem = "no question (a line ending in '?', at least 3 words)"
    elif not answer:
        task.problem = "no 'Answer:' line"
    elif len(answer.split()) > 8:
        task.problem = "answer longer than 8 words"
    elif not norm_answer:
        task.problem = "answer is only punctuation or articles"
    elif norm_answer in normalize(question):
        task.problem = "the question gives its own answer away"
    elif norm_answer not in normalize(material):
        task.problem = "answer not found in the session (a made-up fact)"
    elif checker == "program":
        task.program = fields.get("check", "")
        task.problem = check_program_problem(task.program)
    return task


def parse_span_question(completion: str, sentence: str, answer: str, lead: str = "") -> DreamTask:
    """A "span" task: the model's question for `answer` (a span of `sentence`): `lead` (the
    words the prompt gave) and the first line of `completion`, up to its first '?'."""
    line = (lead + " " + completion.split("\n")[0].strip() if lead
            else completion.strip().split("\n")[0]).strip()
    question = line[:line.index("?") + 1].strip() if "?" in line else line
    task = DreamTask(task_id(question, answer), question, [answer], "match", sentence=sentence,
                     raw=completion, source="span")
    task.problem = span_question_problem(question, sentence, answer)
    return task


def check_program_problem(expression: str) -> str:
    """'' if `expression` is one Python expression over `answer`, else what is wrong."""
    if not expression:
        return "no 'Check:' line"
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return "the check is not a Python expression"
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    if "answer" not in names:
        return "the check does not look at the answer"
    return ""


def rule_task(sentence: str, span: str, title: str = "") -> DreamTask:
    """A question made from `sentence` by rule (learn/spans.py `rule_question`)."""
    question = rule_question(sentence, span, title)
    return DreamTask(task_id(question, span), question, [span], "match", sentence=sentence,
                     source="rule")


def cloze_task(sentence: str, span: str, title: str = "") -> DreamTask:
    """The fallback: `sentence` (windowed) with `span` blanked out."""
    text = window(sentence, span)
    blanked = text.replace(span, "___", 1) if span in text else text
    about = f" about {title}" if title else ""
    question = f"Fill in the blank in this sentence{about}: \"{blanked}\""
    return DreamTask(task_id(question, span), question, [span], "match", sentence=sentence,
                     source="cloze")


# -- writing ---------------------------------------------------------------------------------
def _attempt_params(attempt: int, max_new_tokens: int, stop: Sequence[str], seed: int,
                    temperature: float) -> SamplingParams:
    if attempt == 0:
        return SamplingParams(max_tokens=max_new_tokens, stop=list(stop))
    return SamplingParams(max_tokens=max_new_tokens, stop=list(stop), temperature=temperature,
                          seed=seed + attempt)


def check_writer(style: str, checker: str, fallback: str = "rule") -> None:
    """ValueError, saying what to use instead, unless the writer options go together."""
    if checker not in CHECKERS:
        raise ValueError(f"checker must be one of {', '.join(CHECKERS)}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}")
    if style in ("span", "rule") and checker != "match":
        raise ValueError(f"style {style!r} writes match tasks only; use style 'qa' for program checks")


def write_tasks(lm: LoadedModel, material: str, title: str = "", checker: str = "match",
                max_tasks: int = 24, max_new_tokens: int | None = None, batch: int = 8,
                style: str = "span", attempts: int = 3, fallback: str = "rule",
                spans_per_sentence: int = 2, temperature: float = 0.8,
                seed: int = 0) -> DreamWriting:
    """Tasks for the sentences of `material` (batched; the first attempt greedy, retries
    sampled, only for the units still without a task). Duplicates are dropped. With
    style="span", each sentence gives up to `spans_per_sentence` units (one per answer span),
    at most `max_tasks` units in all; with style="qa", one unit per sentence."""
    check_writer(style, checker, fallback)
    attempts = max(1, attempts)
    tok = lm.tokenizer
    out = DreamWriting([])
    # A unit: (sentence, answer span or None, the question's lead, prompt ids).
    units: list[tuple[str, str | None, str, list[int]]] = []
    if style == "qa":
        new_tokens, stop = max_new_tokens or 48, ["\n\n", "Sentence:"]
        for s in sentences(material)[:max_tasks]:
            spans = answer_spans(s, title)
            units.append((s, spans[0] if spans else None, "",
                          tok.encode(writer_prompt(material, s, title, checker),
                                     add_special_tokens=False)))
    else:
        new_tokens, stop = max_new_tokens or 32, ["\n"]
        used: set[str] = set()
        for s in split_sentences(material):
            spans = [a for a in answer_spans(s, title) if normalize(a) not in used]
            if not spans:
                out.no_span.append(s)
            for a in spans[:spans_per_sentence]:
                used.add(normalize(a))
                lead = question_lead(a)
                prompt = [] if style == "rule" else tok.encode(span_prompt(window(s, a), a, lead),
                                                                add_special_tokens=False)
                units.append((s, a, lead, prompt))
        units = units[:max_tasks]
    out.units = len(units)
    seen: set[str] = set()
    done = [False] * len(units)
    for attempt in range(0 if style == "rule" else attempts):
        todo = [i for i in range(len(units)) if not done[i]]
        if not todo:
            break
        params = _attempt_params(attempt, new_tokens, stop, seed, temperature)
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            completions = generate(lm, [units[i][3] for i in chunk], params)
            for i, completion in zip(chunk, completions, strict=True):
                sentence, span, lead, _ = units[i]
                out.tokens += len(completion.prompt_ids) + len(completion.token_ids)
                if style == "qa":
                    task = parse_task(completion.text, sentence, material, checker)
                else:
                    task = parse_span_question(completion.text, sentence, span, lead)
                task.attempt = attempt
                if not task.problem and task.id in seen:
                    task.problem = "duplicate of an earlier task"
                (out.dropped if task.problem else out.tasks).append(task)
                if not task.problem:
                    seen.add(task.id)
                    done[i] = True
    make = rule_task if style == "rule" or fallback == "rule" else cloze_task
    if style == "rule" or fallback != "none":
        for i, (sentence, span, _, _) in enumerate(units):
            if not done[i] and span:
                task = make(sentence, span, title)
                if task.id not in seen:
                    seen.add(task.id)
                    out.tasks.append(task)
    return out


def materials(context: Sequence[dict]) -> str:
    """The text a session revealed: its user and assistant turns (and a summary)."""
    return "\n".join(m["content"] for m in context if m["role"] in ("user", "assistant", "system"))
