"""The one rule that turns a stored session into the messages a model sees next.

A compaction replaces everything before it: the context is the session's system messages
from before the latest compaction, then the compaction's summary (as a system message),
then every message after it. Tool calls are the assistant's turns; observations are tool turns.
"""

from __future__ import annotations

from collections.abc import Sequence

from onthejob.store.types import Message

SUMMARY_HEADER = "Summary of the conversation so far:\n"


def _as_chat(message: Message) -> dict[str, str]:
    if message.kind == "tool_call":
        return {"role": "assistant", "content": message.content}
    if message.kind == "observation":
        return {"role": "tool", "content": message.content}
    return {"role": message.role, "content": message.content}


def context_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Chat messages ({role, content}) for the model, built from a session's stored messages."""
    return [chat for chat, _ in context_sources(messages)]


def context_sources(messages: Sequence[Message]) -> list[tuple[dict[str, str], Message | None]]:
    """`context_messages`, each with the stored message it shows (None for the summary, which
    stands for many): what learning needs to find what the store kept about a turn."""
    ordered = sorted(messages, key=lambda m: m.seq)
    last = max((i for i, m in enumerate(ordered) if m.kind == "compaction"), default=None)
    if last is None:
        return [(_as_chat(m), m) for m in ordered]
    kept = [(_as_chat(m), m) for m in ordered[:last]
            if m.kind == "message" and m.role == "system"]
    summary = {"role": "system", "content": SUMMARY_HEADER + ordered[last].content}
    return kept + [(summary, None)] + [(_as_chat(m), m) for m in ordered[last + 1:]]
