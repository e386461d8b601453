"""POST /v1/chat/completions: OpenAI's chat API over the session store.

Order of work, so that nothing is stored half: authenticate, read and validate the body,
resolve the session, render the prompt and check it fits; only then store the request's new
messages (one transaction), generate, and store the answer (on the engine's worker, before
the response is sent). Streaming: the new messages are stored before the first byte; the
answer when generation ends, and also if the client disconnects (then the partial answer is
stored with meta.finish_reason = "cancelled").

Log-probs: `logprobs: true` (and `top_logprobs` 0..20) returns OpenAI's choices[0].logprobs,
per answer token its log-probability under the model's untempered distribution (what it
scored, whatever temperature sampled) and the most likely alternatives. Streamed, each chunk
carries the tokens whose text it delivers; a token whose text has not shown yet (half a
character, or text cut by a stop string) comes with a later chunk, the last one (with
finish_reason) carrying whatever is left, so no token is lost. Independently of what the
client asked, the server keeps the top `keep_top_k` of every answer it stores
(store/logprobs.py), for consolidation to reuse as teacher rows (learn/opsd.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from onthejob.model import (
    Completion,
    ContextLengthError,
    LoadedModel,
    SamplingParams,
    render_ids,
)
from onthejob.model.chat import supports_tools
from onthejob.model.generate import Piece
from onthejob.serve.engine import Overloaded
from onthejob.serve.errors import APIError, error_body
from onthejob.serve.http import Principal, ServerContext, read_json
from onthejob.serve.schemas import ChatMessage, ChatRequest, NamedToolChoice
from onthejob.serve.turns import kept_answer, new_messages, prompt_ids, prompt_messages
from onthejob.store import Conflict, NewMessage, NotFound

SESSION_HEADER = "X-Session-Id"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
TOOLS_HEADER = "X-Onthejob-Tools"  # "rendered" or "not-rendered", when the request sent tools


def _plain(value: Any) -> Any:
    """A pydantic value as plain JSON data (for the store)."""
    return value.model_dump() if hasattr(value, "model_dump") else value


def to_new_message(message: ChatMessage) -> NewMessage:
    role = "system" if message.role == "developer" else message.role
    meta = {"name": message.name} if message.name else {}
    if message.role == "assistant" and message.tool_calls:
        content = message.text() or json.dumps(message.tool_calls, ensure_ascii=False)
        return NewMessage("assistant", content, "tool_call", {**meta, "tool_calls": message.tool_calls})
    if message.role == "tool":
        return NewMessage("tool", message.text(), "observation",
                          {**meta, "tool_call_id": message.tool_call_id})
    return NewMessage(role, message.text(), "message", meta)


def sampling(ctx: ServerContext, req: ChatRequest) -> tuple[SamplingParams, bool]:
    """The sampling parameters, and whether max_tokens was left to the server."""
    context = ctx.lm.context_length
    cap = min(ctx.limits.max_tokens or context, context)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if None not in (req.max_tokens, req.max_completion_tokens) \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them "
                       "(max_completion_tokens is OpenAI's current name)", "invalid_value",
                       "max_completion_tokens")
    if asked is not None and not 1 <= asked <= cap:
        raise APIError(400, f"{field} must be between 1 and {cap} (the model's context is "
                       f"{context} tokens)", "invalid_value", field)
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise APIError(400, f"temperature must be between 0 and 2, not {req.temperature}",
                       "invalid_value", "temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise APIError(400, f"top_p must be in (0, 1], not {req.top_p}", "invalid_value",
                       "top_p")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: send \"logprobs\": true with it (or "
                       "leave top_logprobs out)", "invalid_value", "top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, not "
                       f"{req.top_logprobs}", "invalid_value", "top_logprobs")
    shown = (req.top_logprobs or 0) if req.logprobs else 0
    params = SamplingParams(
        max_tokens=asked or ctx.limits.default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, stop=tuple(req.stop or ()), seed=req.seed,
        top_logprobs=max(shown, ctx.keep_top_k))
    try:
        params.validate()
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_value") from None
    return params, asked is None


def session_id_of(request: Request, req: ChatRequest) -> tuple[str | None, str]:
    """The session id the request names, and where it named it (the error's param)."""
    header = request.headers.get(SESSION_HEADER)
    body = (req.metadata or {}).get("session_id")
    if header and body and header != body:
        raise APIError(400, f"the {SESSION_HEADER} header and metadata.session_id differ; "
                       "send one of them", "invalid_value", "metadata.session_id")
    return (header, SESSION_HEADER) if header else (body, "metadata.session_id")


def tool_plan(lm: LoadedModel, req: ChatRequest) -> tuple[list[dict] | None, str | None]:
    """The tool definitions to render into the prompt (None: none), and the statement the
    response carries about them (None when the request sent no tools).

    Tools are rendered where the chat template has a format for them and tool_choice is not
    "none". Whatever the template, the answer is text: onthejob does not parse tool calls out
    of it, so a tool_choice that demands a call ("required", a named function) is refused."""
    if not req.tools:
        return None, None
    if req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice):
        raise APIError(400, f"this server cannot make the model call a tool (tool_choice "
                       f"{req.tool_choice if isinstance(req.tool_choice, str) else 'function'}"
                       f"): answers are plain text and tool calls are not parsed from them; "
                       "send tool_choice 'auto' or 'none'", "tool_choice_unsupported",
                       "tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if req.tool_choice == "none":
        return None, ("tool_choice is 'none': the tools were stored with the session and not "
                      "shown to the model")
    if not supports_tools(lm.tokenizer):
        return None, (f"this model ({lm.name}) cannot call tools: its chat template has no "
                      "format for them, so they were stored with the session but not shown "
                      "to the model; the answer is plain text")
    return tools, ("the tools were rendered into the prompt by the model's chat template; a "
                   "tool call the model writes comes back as text in message.content (it is "
                   "not parsed into tool_calls)")


def _plan(ctx: ServerContext, principal: Principal, session_id: str | None, named_in: str,
          incoming: list[NewMessage]) -> tuple[list[NewMessage], list[dict]]:
    stored = []
    if session_id is not None:
        try:
            session = ctx.store.get_session(principal.tenant, session_id)
            stored = ctx.store.messages(principal.tenant, session_id)
        except NotFound:
            raise APIError(404, f"no session {session_id!r} for this API key",
                           "session_not_found", named_in) from None
        if session.status != "open":
            raise APIError(409, f"session {session_id} has ended; start a new session "
                           "(send no session id)", "session_ended")
    new = new_messages(stored, incoming)
    return new, prompt_messages(session_id or "new", stored, new)


def _store_request(ctx: ServerContext, principal: Principal, session_id: str | None,
                   new: list[NewMessage]) -> str:
    try:
        if session_id is None:
            first_user = next((m.content for m in new if m.role == "user"), "")
            title = " ".join(first_user.split())[:80] or None
            return ctx.store.create_session(principal.tenant, title, new).id
        ctx.store.add_messages(principal.tenant, session_id, new)
        return session_id
    except Conflict as exc:
        raise APIError(409, str(exc), "session_ended") from None


async def chat_completions(ctx: ServerContext, request: Request, principal: Principal):
    req = await read_json(request, ChatRequest, ctx.limits.max_body_bytes)
    if req.model not in ctx.model_ids:
        raise APIError(404, f"the model {req.model!r} does not exist; GET /v1/models lists "
                       f"{', '.join(ctx.model_ids)}", "model_not_found", "model")
    params, defaulted = sampling(ctx, req)
    tools, tools_note = tool_plan(ctx.lm, req)
    incoming = [to_new_message(m) for m in req.messages]
    session_id, named_in = session_id_of(request, req)
    new, chat = await asyncio.to_thread(_plan, ctx, principal, session_id, named_in, incoming)
    try:
        ids = prompt_ids(ctx.lm, chat, 1 if defaulted else params.max_tokens, tools)
    except ContextLengthError as exc:
        message = str(exc)
        if defaulted:  # no max_tokens was sent: the prompt alone leaves no room
            message = (f"the prompt is {len(render_ids(ctx.lm.tokenizer, chat, tools=tools))} "
                       f"tokens, which leaves no room for an answer in the model's context of "
                       f"{ctx.lm.context_length} tokens: shorten the conversation, or compact "
                       "the session (POST /v1/sessions/{id}/compact) and go on from its summary")
        raise APIError(400, message, "context_length_exceeded", "messages") from None
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_value", "messages") from None
    if defaulted:  # no max_tokens given: as much as fits, up to the default
        params.max_tokens = min(params.max_tokens, ctx.lm.context_length - len(ids))
    adapters = await asyncio.to_thread(ctx.adapters.paths, principal.tenant)
    if ctx.engine.queued >= ctx.engine.max_queue:  # refuse before storing anything
        raise APIError(503, f"{ctx.engine.queued} requests are waiting; retry shortly",
                       "server_overloaded")
    offered = {"tools": [t.model_dump(exclude_none=True) for t in req.tools],
               "tool_choice": _plain(req.tool_choice), "tools_rendered": tools is not None} \
        if req.tools else {}
    if offered and new:  # stored with the request's last new message
        new[-1] = replace(new[-1], meta={**new[-1].meta, **offered})
    session_id = await asyncio.to_thread(_store_request, ctx, principal, session_id, new)

    def store_answer(completion: Completion):
        logprobs, kept_meta = kept_answer(completion, ctx.keep_top_k)
        meta = {"finish_reason": completion.finish_reason, "model": ctx.lm.name,
                "prompt_tokens": len(ids), "completion_tokens": len(completion.token_ids),
                "adapters": adapters, **kept_meta, **(offered if not new else {})}
        ctx.store.add_messages(principal.tenant, session_id, [NewMessage(
            "assistant", completion.text, meta=meta, logprobs=logprobs)])
        return completion

    shown = (req.top_logprobs or 0) if req.logprobs else None
    reply = _Reply(ctx, session_id, len(ids), [tools_note] if tools_note else [], shown)
    headers = {SESSION_HEADER: session_id}
    if tools_note:
        headers[TOOLS_HEADER] = "rendered" if tools is not None else "not-rendered"
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        events = reply.stream(ids, params, adapters, store_answer, include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    try:
        future = ctx.engine.submit(ids, params, adapters, then=store_answer)
    except Overloaded as exc:
        raise APIError(503, str(exc), "server_overloaded") from None
    completion = await asyncio.wrap_future(future)
    return JSONResponse(reply.whole(completion), headers=headers)


class _Reply:
    """Response bodies in OpenAI's shapes, with the session id added."""

    def __init__(self, ctx: ServerContext, session_id: str, prompt_tokens: int,
                 warnings: list[str], top_logprobs: int | None = None) -> None:
        self.ctx, self.session_id, self.prompt_tokens = ctx, session_id, prompt_tokens
        self.warnings = warnings  # statements about the request (e.g. tools not shown)
        self.top_logprobs = top_logprobs  # None: the client did not ask for logprobs
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _usage(self, completion: Completion) -> dict:
        n = len(completion.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                "total_tokens": self.prompt_tokens + n}

    def whole(self, completion: Completion) -> dict:
        logprobs = self._logprobs(completion.token_ids, completion.logprobs,
                                  completion.top_logprobs)
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.ctx.lm.name, "session_id": self.session_id,
                "choices": [{"index": 0, "finish_reason": completion.finish_reason,
                             "logprobs": logprobs,
                             "message": {"role": "assistant", "content": completion.text}}],
                "usage": self._usage(completion), **self._warnings()}

    def _logprobs(self, token_ids, logprobs, tops) -> dict | None:
        """OpenAI's choice.logprobs for these tokens (None when the client did not ask)."""
        if self.top_logprobs is None:
            return None
        text, n = self.ctx.token_text, self.top_logprobs
        content = []
        for j, (token, logprob) in enumerate(zip(token_ids, logprobs, strict=True)):
            alternatives = tops[j][:n] if tops is not None and n else []
            content.append({**text.entry(token, logprob), "top_logprobs": [
                text.entry(i, v) for i, v in alternatives]})
        return {"content": content, "refusal": None}

    def _warnings(self) -> dict:
        return {"warnings": self.warnings} if self.warnings else {}

    def _chunk(self, delta: dict | None, finish: str | None = None,
               usage: dict | None = None, logprobs: dict | None = None) -> str:
        """One SSE event; delta None gives the usage-only chunk (empty choices), as OpenAI."""
        choices = [] if delta is None else [{"index": 0, "delta": delta,
                                             "finish_reason": finish, "logprobs": logprobs}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.ctx.lm.name, "session_id": self.session_id, "choices": choices}
        if delta is not None and delta.get("role"):  # the first chunk says what the body would
            body.update(self._warnings())
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, ids, params, adapters, store_answer,
                     include_usage: bool) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        try:
            future = self.ctx.engine.submit_stream(ids, params, adapters, put, cancel,
                                                   then=store_answer)
        except Overloaded as exc:
            yield f"data: {json.dumps(error_body(503, str(exc), 'server_overloaded'))}\n\n"
            return
        future.add_done_callback(lambda _f: put(done))
        sent = 0  # tokens whose logprobs a chunk has carried
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while (item := await queue.get()) is not done:
                logprobs = None
                if isinstance(item, Piece):
                    logprobs = self._logprobs(item.token_ids, item.logprobs, item.top_logprobs)
                    sent += len(item.token_ids)
                elif self.top_logprobs is not None:  # an engine that streams plain text:
                    logprobs = {"content": [], "refusal": None}  # the last chunk has them all
                yield self._chunk({"content": str(item)}, logprobs=logprobs)
            try:
                completion = future.result()
            except Exception:  # noqa: BLE001 - reported to the client in the stream
                body = error_body(500, "generation failed; the server log has the details",
                                  "generation_failed")
                yield f"data: {json.dumps(body)}\n\n"
                return
            rest = completion.top_logprobs[sent:] if completion.top_logprobs is not None else None
            yield self._chunk({}, completion.finish_reason, logprobs=self._logprobs(
                completion.token_ids[sent:], completion.logprobs[sent:], rest))
            if include_usage:
                yield self._chunk(None, usage=self._usage(completion))
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a no-op when generation has finished; stops it if the client left
