"""A lesson: what one approved session teaches, in the form every learning rule consumes.

The teacher's context is the session (its compaction, when it has one, replaces the turns
it summarized) followed by the reviewer's words. Student prompts never see that context.
Where the server kept an answer's token ids and top-k log-probs (store/logprobs.py), the
lesson carries them by the answer's place in the context (`Lesson.kept`), for OPSD to reuse
as the teacher's row for the replayed turn (learn/opsd.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from onthejob.learn.practice import PracticePrompt
from onthejob.model import LoadedModel, render_ids
from onthejob.model.chat import Message
from onthejob.store.context import context_messages as store_context
from onthejob.store.context import context_sources
from onthejob.store.types import Message as StoredMessage


class ContextTooLongError(ValueError):
    """A session does not fit the teacher's context; compact it or leave it out."""


@dataclass
class Lesson:
    session_id: str
    context: list[Message]
    probes: list[str] = field(default_factory=list)  # student prompts (replayed + self-written)
    held_out: list[str] = field(default_factory=list)  # probes kept back for the gate
    title: str = ""
    # The probes with what is known about each (the span asked for, the session's own
    # answer); learn/practice.py. Where a probe has no entry it is a plain question.
    practice: list[PracticePrompt] = field(default_factory=list)
    # Kept log-probs (store/logprobs.py's encoding) of the context's answers, by their index
    # in `context`: the inference compute that produced them, for the teacher to reuse.
    kept: dict[int, bytes] = field(default_factory=dict)
    # The review's words (none: ""). OPSD with `review_prompts` also teaches them as an
    # instruction, on ordinary prompts (`review_lesson`).
    review: str = ""

    def prompts(self) -> list[PracticePrompt]:
        """Every training probe, as a PracticePrompt (known answers attached where known)."""
        known = {p.text: p for p in self.practice}
        return [known.get(text, PracticePrompt(text, "question")) for text in self.probes]


def teacher_context(messages: Sequence[StoredMessage], review_text: str = "") -> list[Message]:
    """Teacher context: the store's one context rule (`store.context_messages`: a compaction
    replaces what came before it), then the reviewer's words."""
    return [*store_context(messages), *review_turns(review_text)]


# How the review's words read as the teacher's instruction (`review_lesson`).
REVIEW_HEADER = "The user's feedback on this session, to keep to from now on:"


def default_system(tokenizer) -> str:
    """The system prompt the chat template puts in when none is given ("" if it puts none)."""
    probe = "\x00probe\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False,
                                         add_generation_prompt=False)
    start = text.find("<|im_start|>system\n")
    if start < 0 or start > text.find(probe):
        return ""
    body = text[start + len("<|im_start|>system\n"):]
    return body[: body.find("<|im_end|>")]


def instruction_messages(tokenizer, header: str, words: str) -> list[Message]:
    """A system message: the template's own system prompt, then `header` and `words`."""
    system = default_system(tokenizer)
    return [{"role": "system", "content": f"{system}\n\n{header} {words}".strip()}]


def review_lesson(tokenizer, lesson: Lesson, prompts: Sequence[str]) -> Lesson:
    """The review's words taught as an instruction: a lesson whose teacher reads only them,
    in its system prompt, and answers `prompts` (ordinary ones, nothing of the session), so
    that what the reviewer asked for ("always call it Nimbus") holds everywhere, not only
    where the session's own answers showed it. A review that asks nothing of the sort
    ("good, remember the codename") leaves those answers as the model gives them anyway."""
    practice = [PracticePrompt(text, "review") for text in prompts]
    return Lesson(f"{lesson.session_id}:review", instruction_messages(tokenizer, REVIEW_HEADER, lesson.review),
                  [p.text for p in practice], practice=practice)


def review_turns(review_text: str) -> list[Message]:
    """The reviewer's words as the teacher reads them, after the session: a user turn giving
    the feedback and the model's acknowledgement (none for a review without words)."""
    if not review_text.strip():
        return []
    return [{"role": "user", "content": f"My feedback on this session: {review_text.strip()}"},
            {"role": "assistant", "content": "Thank you, I will keep that in mind."}]


def kept_answers(messages: Sequence[StoredMessage], logprobs: dict[int, bytes],
                 served_with: Sequence[str] | None = None) -> tuple[dict[int, bytes], int]:
    """The kept log-probs (`Store.kept_logprobs`, by message id) of the answers in
    `teacher_context(messages)`, by their index there; and how many were left out because the
    answer was served with other adapters than `served_with` (the teacher's: the parent and
    what is stacked below it; None: no check), or its meta does not say which. An answer the
    model gave with other weights is not the teacher's distribution."""
    out, stale = {}, 0
    for index, (_, source) in enumerate(context_sources(messages)):
        if source is None or source.id not in logprobs:
            continue
        served = source.meta.get("adapters")  # absent: unknown, so not the teacher's for sure
        if served_with is not None and (served is None or list(served) != list(served_with)):
            stale += 1
            continue
        out[index] = logprobs[source.id]
    return out, stale


def check_fits(lm: LoadedModel, lesson: Lesson, room: int = 256) -> int:
    """Tokens of the lesson's context; refuse (never truncate) when the context plus a probe
    turn and an answer (`room`) would not fit."""
    n = len(render_ids(lm.tokenizer, lesson.context, add_generation_prompt=False))
    if n + room > lm.context_length:
        raise ContextTooLongError(
            f"session {lesson.session_id} is {n} tokens; with {room} tokens for a probe and its "
            f"answer it exceeds the model's context of {lm.context_length}. Run /compact in the "
            "session (or `--compact-long` to compact it now), or leave it out with --sessions"
        )
    return n
