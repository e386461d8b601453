"""Dreamed tasks: the model with the session in front of it writes one practice task per
sentence of what it saw: a question, the expected answer, and optionally a check (a
Python expression over `answer`, run only in the sandbox).

A 135M model does not follow free-form instructions (DESIGN.md), so the writer is a
few-shot completion, one sentence at a time, after the session's material:

    Sentence: The Eiffel Tower was completed in 1889 for the World's Fair in Paris.
    Question: When was the Eiffel Tower completed?
    Answer: 1889
    [Check: "1889" in answer]

Parsing is strict and every failure is kept with its reason, so the parse rate is measured.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from onthejob.learn.evaluate import normalize
from onthejob.learn.probes import sentences
from onthejob.model import LoadedModel, SamplingParams, generate

CHECKERS = ("match", "program")

_EXAMPLES = (
    ("The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
     "When was the Eiffel Tower completed?", "1889", '"1889" in answer'),
    ("Marie Curie won the Nobel Prize in Chemistry in 1911 for discovering radium.",
     "What did Marie Curie discover?", "radium", '"radium" in answer.lower()'),
    ("The Amazon River flows through Brazil, Peru and Colombia.",
     "Which country does the Amazon River flow through first?", "Brazil",
     '"brazil" in answer.lower()'),
)


@dataclass
class DreamTask:
    """One dreamed task. `checker` is "match" (normalized containment, else token F1 against
    `answers`) or "program" (`program` is a Python expression over `answer`)."""

    id: str
    question: str
    answers: list[str]
    checker: str = "match"
    program: str = ""
    sentence: str = ""
    raw: str = ""  # what the model wrote, kept for `dream show`
    problem: str = ""  # why it was not parsed into a usable task ("" when it was)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DreamTask:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class DreamWriting:
    tasks: list[DreamTask]  # parsed and usable
    dropped: list[DreamTask] = field(default_factory=list)  # with `problem` set
    tokens: int = 0  # prompt + generated tokens spent writing

    @property
    def parse_rate(self) -> float:
        return len(self.tasks) / max(len(self.tasks) + len(self.dropped), 1)


def few_shot(checker: str = "match") -> str:
    blocks = []
    for sentence, question, answer, check in _EXAMPLES:
        block = f"Sentence: {sentence}\nQuestion: {question}\nAnswer: {answer}\n"
        if checker == "program":
            block += f"Check: {check}\n"
        blocks.append(block)
    return "\n".join(blocks) + "\n"


def writer_prompt(material: str, sentence: str, title: str = "", checker: str = "match") -> str:
    """The session's material, the few-shot examples, then the sentence to write about."""
    head = f"Notes about {title}:\n" if title else "Notes:\n"
    return (f"{head}{material.strip()}\n\nQuiz questions about single sentences, each answered "
            f"by a few words of the sentence.\n\n{few_shot(checker)}Sentence: {sentence}\nQuestion:")


def task_id(question: str, answer: str) -> str:
    return hashlib.sha256(f"{question}\n{answer}".encode()).hexdigest()[:10]


def parse_task(completion: str, sentence: str, material: str, checker: str = "match") -> DreamTask:
    """A task from the text the model wrote after "Question:"; `problem` says what is wrong."""
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


def write_tasks(lm: LoadedModel, material: str, title: str = "", checker: str = "match",
                max_tasks: int = 24, max_new_tokens: int = 48, batch: int = 8) -> DreamWriting:
    """One task per sentence of `material` (greedy, batched). Duplicates are dropped."""
    if checker not in CHECKERS:
        raise ValueError(f"checker must be one of {', '.join(CHECKERS)}")
    tok = lm.tokenizer
    items = sentences(material)[:max_tasks]
    prompts = [tok.encode(writer_prompt(material, s, title, checker), add_special_tokens=False)
               for s in items]
    out = DreamWriting([])
    seen: set[str] = set()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        params = SamplingParams(max_tokens=max_new_tokens, stop=["\n\n", "Sentence:"])
        for sentence, completion in zip(items[start:start + batch], generate(lm, chunk, params),
                                        strict=True):
            out.tokens += len(completion.prompt_ids) + len(completion.token_ids)
            task = parse_task(completion.text, sentence, material, checker)
            if not task.problem and task.id in seen:
                task.problem = "duplicate of an earlier task"
            (out.dropped if task.problem else out.tasks).append(task)
            seen.add(task.id)
    return out


def materials(context: Sequence[dict]) -> str:
    """The text a session revealed: its user and assistant turns (and a summary)."""
    return "\n".join(m["content"] for m in context if m["role"] in ("user", "assistant", "system"))
