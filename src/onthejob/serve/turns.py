"""What the server and the chat share about a turn: which of a request's messages are new,
the prompt the model sees (the store's context rule), the adapters a tenant is served with,
and compaction (the model summarizes the session; later turns start from the summary)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from onthejob.model import LoadedModel, SamplingParams, check_fits, render_ids
from onthejob.model.adapters import AdapterError, verify
from onthejob.serve.engine import Engine
from onthejob.store import Message, NewMessage, Store, Tenant, context_messages

log = logging.getLogger(__name__)

COMPACT_INSTRUCTION = (
    "Summarize the conversation so far for your own later use: the facts, decisions, "
    "open questions and anything the user asked you to remember. Be concise and complete."
)


def _chat_form(message: Message | NewMessage) -> tuple[str, str, str]:
    return (message.role, message.kind, message.content)


def new_messages(stored: Sequence[Message], incoming: Sequence[NewMessage]) -> list[NewMessage]:
    """The messages of a request that the session does not have yet.

    A client that resends the whole conversation (as OpenAI clients do) has its stored
    prefix skipped. Otherwise (a client that sends only its new turn, or one whose history
    differs from the store's) the new messages are those after the request's last assistant
    message: the store's session stays the conversation of record.
    """
    transcript = [_chat_form(m) for m in sorted(stored, key=lambda m: m.seq)
                  if m.kind != "compaction"]
    head = [_chat_form(m) for m in incoming[: len(transcript)]]
    if head == transcript:
        return list(incoming[len(transcript):])
    last_answer = max((i for i, m in enumerate(incoming) if m.role == "assistant"), default=-1)
    return list(incoming[last_answer + 1:])


def _as_messages(session_id: str, stored: Sequence[Message],
                 new: Sequence[NewMessage]) -> list[Message]:
    start = max((m.seq for m in stored), default=-1) + 1
    pending = [Message(id=0, session_id=session_id, seq=start + i, role=m.role,
                       content=m.content, kind=m.kind, meta=m.meta, created_at=None)
               for i, m in enumerate(new)]
    return list(stored) + pending


def prompt_messages(session_id: str, stored: Sequence[Message],
                    new: Sequence[NewMessage]) -> list[dict[str, str]]:
    """The chat the model answers: the store's context rule over stored + new messages."""
    return context_messages(_as_messages(session_id, stored, new))


def prompt_ids(lm: LoadedModel, chat: Sequence[dict[str, str]], max_tokens: int,
               tools: Sequence[dict] | None = None) -> list[int]:
    """Rendered prompt ids; raises ContextLengthError (with the allowed length) if too long."""
    ids = render_ids(lm.tokenizer, chat, tools=tools)
    check_fits(lm, len(ids), max_tokens)
    return ids


class AdapterResolver:
    """The adapter paths a tenant is served with: the shared active adapter (if the tenant
    allows shared learning), then its own. Re-read per request, so a newly activated adapter
    is used at once. An adapter whose files fail their checksum is skipped for its parent."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._verified: dict[str, tuple[float, bool]] = {}

    def paths(self, tenant: Tenant) -> list[str]:
        scopes = (("shared", None), ("tenant", tenant)) if tenant.allow_shared \
            else (("tenant", tenant),)
        found = []
        for scope, owner in scopes:
            adapter = self.store.active_adapter(owner, scope=scope)
            while adapter is not None and not self._ok(adapter.path, adapter.checksum):
                log.error("adapter %s (v%s) is corrupt or missing; serving its parent",
                          adapter.id, adapter.version)
                adapter = self.store.get_adapter(adapter.parent_id) if adapter.parent_id else None
            if adapter is not None:
                found.append(adapter.path)
        return found

    def _ok(self, path: str, expected: str) -> bool:
        try:
            stamp = os.stat(os.path.join(path, "adapter_model.safetensors")).st_mtime
        except OSError:
            return False
        cached = self._verified.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        try:
            ok = verify(path) == expected
        except AdapterError:
            ok = False
        self._verified[path] = (stamp, ok)
        return ok


def compact(engine: Engine, store: Store, tenant: Tenant | str, session_id: str,
            adapters: Sequence[str] = (), max_tokens: int = 256) -> Message:
    """Have the model summarize the session so far and store it as a compaction message."""
    chat = context_messages(store.messages(tenant, session_id))
    if not chat:
        raise ValueError("the session is empty: there is nothing to compact")
    chat = chat + [{"role": "user", "content": COMPACT_INSTRUCTION}]
    ids = prompt_ids(engine.lm, chat, max_tokens)
    summary = engine.complete(ids, SamplingParams(max_tokens=max_tokens), adapters)
    return store.add_message(tenant, session_id, "system", summary.text.strip(),
                             kind="compaction",
                             meta={"finish_reason": summary.finish_reason,
                                   "completion_tokens": len(summary.token_ids)})
