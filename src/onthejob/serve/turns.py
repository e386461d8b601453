"""What the server and the chat share about a turn: which of a request's messages are new,
the prompt the model sees (the store's context rule), the adapters a tenant is served with,
and compaction (the model summarizes the session; later turns start from the summary)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from onthejob.model import Completion, LoadedModel, SamplingParams, check_fits, render_ids
from onthejob.model.adapters import AdapterError, verify
from onthejob.serve.engine import Engine
from onthejob.store import Message, NewMessage, Store, Tenant, context_messages
from onthejob.store import logprobs as kept_logprobs

log = logging.getLogger(__name__)

# Top log-probs kept per token of every stored answer (= OPSD's top_k, learn/opsd.py).
DEFAULT_KEEP_TOP_K = 32

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


def kept_answer(completion: Completion, k: int) -> tuple[bytes | None, dict[str, Any]]:
    """What the store keeps of an answer for learning: its token ids and top-`k` log-probs
    (store/logprobs.py), and the meta entry that says so; (None, {}) with k = 0, or when the
    completion carries no top lists (a cancelled stream)."""
    tops = completion.top_logprobs
    if not k or tops is None or len(tops) != len(completion.token_ids) \
            or not completion.token_ids or any(len(t) < k for t in tops):
        return None, {}
    stop = completion.stop_top if completion.stop_top and len(completion.stop_top) >= k else None
    data = kept_logprobs.encode(completion.token_ids, tops, stop, k)
    return data, {"logprobs_kept": {"k": k, "tokens": len(completion.token_ids),
                                    "ended": stop is not None, "bytes": len(data)}}


class TokenText:
    """A token's text and UTF-8 bytes, as OpenAI's logprobs show them. A byte-level BPE token
    holds raw bytes (half a character, at times): its bytes are exact, and its text is the
    bytes decoded, or "bytes:\\xe2\\x80" where they are not whole UTF-8 (OpenAI's
    convention). Other tokenizers: the token decoded on its own."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self._bytes_of = {c: b for b, c in _byte_alphabet().items()}
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._text(token_id)
        return found

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    def _text(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tok.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return "", []
        if self.byte_level and token_id not in self._special \
                and all(c in self._bytes_of for c in piece):
            raw = bytes(self._bytes_of[c] for c in piece)
        else:
            raw = (piece if token_id in self._special
                   else self.tok.decode([int(token_id)])).encode("utf-8")
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


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
