"""The OpenAI-compatible HTTP server. `create_app(lm, store)` builds it (tests use the tiny
model in-process); `onthejob serve` runs it under uvicorn on loopback.

Endpoints (all but /health need `Authorization: Bearer <key>`):
  GET  /health                       liveness, no key
  GET  /v1/models, /v1/models/{id}   the served model
  POST /v1/chat/completions          OpenAI chat completions, streaming (SSE) or not
  GET  /v1/sessions                  the caller's sessions (?status=open|ended&limit&offset)
  POST /v1/sessions                  start a session explicitly ({"title": ...})
  GET  /v1/sessions/{id}             one session with its messages and review
  POST /v1/sessions/{id}/review      {"verdict": "up"|"down", "text": "..."}
  POST /v1/sessions/{id}/end         end the session
  POST /v1/sessions/{id}/compact     the model summarizes the session; later turns build on it
  POST /v1/sessions/{id}/dream       start a dream (background job) -> its run id
  GET  /v1/dreams, /v1/dreams/{id}   the caller's dreams: status, progress, tasks and verdicts
  /v1/admin/...                      tenants and keys: see serve/admin.py
  /review/...                        the review page in a browser (serve/web), signed in with a key
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request

from onthejob import config
from onthejob.model import ContextLengthError, LoadedModel
from onthejob.serve import errors, openapi
from onthejob.serve.admin import add_admin_routes
from onthejob.serve.completions import SESSION_HEADER, chat_completions
from onthejob.serve.dreams import add_dream_routes
from onthejob.serve.engine import Engine
from onthejob.serve.errors import APIError
from onthejob.serve.http import Limits, Principal, ServerContext, authenticate, read_json
from onthejob.serve.schemas import ReviewRequest, SessionCreate
from onthejob.serve.turns import DEFAULT_KEEP_TOP_K, AdapterResolver, compact
from onthejob.serve.web import add_review_pages
from onthejob.store import Conflict, NotFound, Session, Store


def _json(value: Any) -> Any:
    """Dataclasses to JSON-ready dicts (datetimes as ISO strings)."""
    data = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    if isinstance(data, dict):
        return {k: _json(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_json(v) for v in data]
    return data.isoformat() if hasattr(data, "isoformat") else data


def _session_json(session: Session) -> dict:
    return {"object": "session", **_json(session)}


def _created(lm: LoadedModel) -> int:
    """The model's `created` time: when its directory's config was written (stable across
    requests and restarts); for a model without a directory, when this process loaded it."""
    try:
        return int((Path(lm.path) / "config.json").stat().st_mtime)
    except OSError:
        return _STARTED


_STARTED = int(time.time())


def create_app(lm: LoadedModel, store: Store, *, limits: Limits | None = None,
               engine: Engine | None = None, figures: Path | None = None,
               keep_top_k: int = DEFAULT_KEEP_TOP_K) -> FastAPI:
    """The server app. It owns (and closes on shutdown) an Engine unless one is given.
    `figures`: the folder of benchmark plots the review page shows (default:
    config.figures_dir()). `keep_top_k`: the top log-probs kept with every stored answer
    for learning (0: none; serve/completions.py)."""
    own_engine = engine is None
    ctx = ServerContext(lm=lm, store=store, engine=engine or Engine(lm),
                        adapters=AdapterResolver(store), limits=limits or Limits(),
                        keep_top_k=keep_top_k)
    app = FastAPI(title="onthejob", version="0.1.0",
                  description="OpenAI-compatible chat over co-work sessions that the model "
                  f"learns from. Group requests into a session with the {SESSION_HEADER} "
                  "header or metadata.session_id.")
    app.state.ctx = ctx
    errors.install(app)
    openapi.install(app, SESSION_HEADER)
    if own_engine:
        app.router.on_shutdown.append(ctx.engine.close)

    def principal(request: Request) -> Principal:
        who = authenticate(ctx, request)
        if who.is_operator:
            raise APIError(403, "an operator key manages tenants and belongs to none: use a "
                           "tenant's key for sessions, chat and dreams", "tenant_key_required")
        return who

    def not_found(session_id: str) -> APIError:
        return APIError(404, f"no session {session_id!r} for this API key", "session_not_found")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": lm.name}

    model_card = {"id": lm.name, "object": "model", "created": _created(lm),
                  "owned_by": "onthejob", "context_length": lm.context_length}

    @app.get("/v1/models")
    def models(_who: Principal = Depends(principal)) -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str, _who: Principal = Depends(principal)) -> dict:
        if model_id not in ctx.model_ids:
            raise APIError(404, f"the model {model_id!r} does not exist; GET /v1/models lists "
                           f"{', '.join(ctx.model_ids)}", "model_not_found", "model")
        return model_card

    @app.post("/v1/chat/completions")
    async def completions(request: Request, who: Principal = Depends(principal)):
        return await chat_completions(ctx, request, who)

    @app.get("/v1/sessions")
    def list_sessions(status: str | None = Query(None, pattern="^(open|ended)$"),
                      limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**31 - 1),
                      who: Principal = Depends(principal)) -> dict:
        found = store.list_sessions(who.tenant, status=status, limit=limit, offset=offset)
        return {"object": "list", "data": [_session_json(s) for s in found]}

    @app.post("/v1/sessions")
    async def create_session(request: Request, who: Principal = Depends(principal)) -> dict:
        body = await read_json(request, SessionCreate, ctx.limits.max_body_bytes)
        session = await asyncio.to_thread(store.create_session, who.tenant, body.title)
        return _session_json(session)

    @app.get("/v1/sessions/{session_id}")
    def get_session(session_id: str, who: Principal = Depends(principal)) -> dict:
        try:
            session = store.get_session(who.tenant, session_id)
            messages = store.messages(who.tenant, session_id)
            review = store.get_review(who.tenant, session_id)
        except NotFound:
            raise not_found(session_id) from None
        return {**_session_json(session), "messages": _json(messages),
                "review": _json(review) if review else None}

    @app.post("/v1/sessions/{session_id}/review")
    async def review(session_id: str, request: Request,
                     who: Principal = Depends(principal)) -> dict:
        body = await read_json(request, ReviewRequest, ctx.limits.max_body_bytes)
        try:
            saved = await asyncio.to_thread(store.set_review, who.tenant, session_id,
                                            body.verdict, body.text)
        except NotFound:
            raise not_found(session_id) from None
        except Conflict as exc:
            raise APIError(409, str(exc), "session_consolidated") from None
        return {"object": "review", **_json(saved)}

    @app.post("/v1/sessions/{session_id}/end")
    def end(session_id: str, who: Principal = Depends(principal)) -> dict:
        try:
            return _session_json(store.end_session(who.tenant, session_id))
        except NotFound:
            raise not_found(session_id) from None

    @app.post("/v1/sessions/{session_id}/compact")
    def compact_session(session_id: str, who: Principal = Depends(principal)) -> dict:
        try:
            adapters = ctx.adapters.paths(who.tenant)
            message = compact(ctx.engine, store, who.tenant, session_id, adapters)
        except NotFound:
            raise not_found(session_id) from None
        except Conflict as exc:
            raise APIError(409, str(exc), "session_ended") from None
        except ContextLengthError as exc:
            raise APIError(400, str(exc), "context_length_exceeded") from None
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_value") from None
        return {"object": "message", **_json(message)}

    app.state.dreams = add_dream_routes(app, ctx, principal)

    add_admin_routes(app, ctx)

    add_review_pages(app, ctx, figures if figures is not None else config.figures_dir())
    return app
