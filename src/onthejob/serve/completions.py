"""POST /v1/chat/completions: OpenAI's chat API over the session store.

Order of work, so that nothing is stored half: authenticate, read and validate the body,
resolve the session, render the prompt and check it fits; only then store the request's new
messages (one transaction), generate, and store the answer (on the engine's worker, before
the response is sent). Streaming: the new messages are stored before the first byte; the
answer when generation ends, and also if the client disconnects (then the partial answer is
stored with meta.finish_reason = "cancelled")."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from onthejob.model import Completion, ContextLengthError, SamplingParams
from onthejob.serve.engine import Overloaded
from onthejob.serve.errors import APIError, error_body
from onthejob.serve.http import Principal, ServerContext, read_json
from onthejob.serve.schemas import ChatMessage, ChatRequest
from onthejob.serve.turns import new_messages, prompt_ids, prompt_messages
from onthejob.store import Conflict, NewMessage, NotFound

SESSION_HEADER = "X-Session-Id"


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
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked is not None and not 1 <= asked <= cap:
        raise APIError(400, f"max_tokens must be between 1 and {cap} (the model's context is "
                       f"{context} tokens)", "invalid_value", "max_tokens")
    params = SamplingParams(
        max_tokens=asked or ctx.limits.default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, stop=tuple(req.stop or ()), seed=req.seed)
    try:
        params.validate()
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_value") from None
    return params, asked is None


def session_id_of(request: Request, req: ChatRequest) -> str | None:
    header = request.headers.get(SESSION_HEADER)
    body = (req.metadata or {}).get("session_id")
    if header and body and header != body:
        raise APIError(400, f"the {SESSION_HEADER} header and metadata.session_id differ; "
                       "send one of them", "invalid_value", "metadata.session_id")
    return header or body


def _plan(ctx: ServerContext, principal: Principal, session_id: str | None,
          incoming: list[NewMessage]) -> tuple[list[NewMessage], list[dict]]:
    stored = []
    if session_id is not None:
        try:
            session = ctx.store.get_session(principal.tenant, session_id)
            stored = ctx.store.messages(principal.tenant, session_id)
        except NotFound:
            raise APIError(404, f"no session {session_id!r} for this API key",
                           "session_not_found", SESSION_HEADER) from None
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
    incoming = [to_new_message(m) for m in req.messages]
    session_id = session_id_of(request, req)
    new, chat = await asyncio.to_thread(_plan, ctx, principal, session_id, incoming)
    try:
        ids = prompt_ids(ctx.lm, chat, 1 if defaulted else params.max_tokens)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), "context_length_exceeded", "messages") from None
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_value", "messages") from None
    if defaulted:  # no max_tokens given: as much as fits, up to the default
        params.max_tokens = min(params.max_tokens, ctx.lm.context_length - len(ids))
    adapters = await asyncio.to_thread(ctx.adapters.paths, principal.tenant)
    if ctx.engine.queued >= ctx.engine.max_queue:  # refuse before storing anything
        raise APIError(503, f"{ctx.engine.queued} requests are waiting; retry shortly",
                       "server_overloaded")
    session_id = await asyncio.to_thread(_store_request, ctx, principal, session_id, new)

    def store_answer(completion: Completion):
        meta = {"finish_reason": completion.finish_reason, "model": ctx.lm.name,
                "prompt_tokens": len(ids), "completion_tokens": len(completion.token_ids),
                "adapters": adapters}
        ctx.store.add_message(principal.tenant, session_id, "assistant", completion.text,
                              meta=meta)
        return completion

    reply = _Reply(ctx, session_id, len(ids))
    headers = {SESSION_HEADER: session_id}
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

    def __init__(self, ctx: ServerContext, session_id: str, prompt_tokens: int) -> None:
        self.ctx, self.session_id, self.prompt_tokens = ctx, session_id, prompt_tokens
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _usage(self, completion: Completion) -> dict:
        n = len(completion.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                "total_tokens": self.prompt_tokens + n}

    def whole(self, completion: Completion) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.ctx.lm.name, "session_id": self.session_id,
                "choices": [{"index": 0, "finish_reason": completion.finish_reason,
                             "logprobs": None,
                             "message": {"role": "assistant", "content": completion.text}}],
                "usage": self._usage(completion)}

    def _chunk(self, delta: dict | None, finish: str | None = None,
               usage: dict | None = None) -> str:
        """One SSE event; delta None gives the usage-only chunk (empty choices), as OpenAI."""
        choices = [] if delta is None else [{"index": 0, "delta": delta,
                                             "finish_reason": finish, "logprobs": None}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.ctx.lm.name, "session_id": self.session_id, "choices": choices}
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
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while (item := await queue.get()) is not done:
                yield self._chunk({"content": item})
            try:
                completion = future.result()
            except Exception:  # noqa: BLE001 - reported to the client in the stream
                body = error_body(500, "generation failed; the server log has the details",
                                  "generation_failed")
                yield f"data: {json.dumps(body)}\n\n"
                return
            yield self._chunk({}, completion.finish_reason)
            if include_usage:
                yield self._chunk(None, usage=self._usage(completion))
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # a no-op when generation has finished; stops it if the client left
