"""The one chat-template renderer. Every caller that turns messages into token ids uses it,
so teacher, student, server and benchmarks see identical ids for identical text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError with a clear reason when `messages` is not a chat."""
    if not messages:
        raise ValueError("messages is empty: give at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] is not an object")
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template has a format for tool definitions (it reads a
    `tools` variable); SmolLM2's does not."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = " ".join(template.values())
    return "tools" in template


def render_text(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
                tools: Sequence[dict] | None = None) -> str:
    """`tools` (OpenAI function definitions) are rendered by the template; give them only
    where `supports_tools` says it has a format for them."""
    validate_messages(messages)
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    extra = {"tools": list(tools)} if tools else {}
    return tokenizer.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )


def render_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of `messages` in the model's chat template, ready for the assistant's answer."""
    text = render_text(tokenizer, messages, add_generation_prompt, tools)
    return list(tokenizer.encode(text, add_special_tokens=False))


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    ids.discard(None)
    return ids
