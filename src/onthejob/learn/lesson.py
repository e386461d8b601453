"""A lesson: what one approved session teaches, in the form every learning rule consumes.

The teacher's context is the session (its compaction, when it has one, replaces the turns
it summarized) followed by the reviewer's words. Student prompts never see that context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from onthejob.learn.practice import PracticePrompt
from onthejob.model import LoadedModel, render_ids
from onthejob.model.chat import Message
from onthejob.store.context import context_messages as store_context
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

    def prompts(self) -> list[PracticePrompt]:
        """Every training probe, as a PracticePrompt (known answers attached where known)."""
        known = {p.text: p for p in self.practice}
        return [known.get(text, PracticePrompt(text, "question")) for text in self.probes]


def teacher_context(messages: Sequence[StoredMessage], review_text: str = "") -> list[Message]:
    """Teacher context: the store's one context rule (`store.context_messages`: a compaction
    replaces what came before it), then the reviewer's words."""
    out = store_context(messages)
    if review_text.strip():
        out.append({"role": "user", "content": f"My feedback on this session: {review_text.strip()}"})
        out.append({"role": "assistant", "content": "Thank you, I will keep that in mind."})
    return out


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
