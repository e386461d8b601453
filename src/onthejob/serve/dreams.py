"""Dreams through the server: a background job per request, its progress in the runs table.

  POST /v1/sessions/{id}/dream   {"budget": "20steps", "mode": "opsd", "checker": "match"}
                                 -> 202 {"object": "dream", "id": RUN_ID, "status": ...}
  GET  /v1/dreams                the caller's dream runs
  GET  /v1/dreams/{run_id}       status, phase and progress (step, ETA), and once written the
                                 tasks' counts and gate verdicts; 404 for another tenant's run

Jobs run one at a time on their own thread, on a private copy of the served model (made
under the engine's lock), so training never touches the weights that answer requests. A
newly promoted adapter is served from the next request on (the resolver re-reads it).

A server stopped mid-job (killed, crashed) leaves its dream runs "running"; the next server
marks them "interrupted" when it starts, and the same request again (same session, budget,
mode and checker) resumes the interrupted run: its gated tasks and its training checkpoint.
"""

from __future__ import annotations

import copy
import logging
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from onthejob.model.threads import run_in_thread
from onthejob.serve.errors import APIError
from onthejob.serve.http import Principal, ServerContext, read_json
from onthejob.serve.schemas import Strict
from onthejob.store import NotFound, Run

log = logging.getLogger(__name__)


class DreamRequest(Strict):
    budget: str = Field(default="20steps", max_length=32,
                        description="steps, tokens or minutes: 20, 20steps, 50000tokens, 5min")
    mode: Literal["opsd", "grpo", "both"] = "opsd"
    checker: Literal["match", "program"] = "match"


class DreamJobs:
    """A queue of dream runs, worked one at a time on a copy of the served model."""

    def __init__(self, ctx: ServerContext, max_pending: int = 4) -> None:
        self.ctx, self.max_pending = ctx, max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="onthejob-dream")
        self._pending = 0
        self._count = threading.Lock()
        self._lm = None
        for dead in ctx.store.interrupt_dead_runs():
            log.warning("run %s (%s) had stopped mid-way (its process is gone); marked "
                        "interrupted", dead.id, dead.kind)

    def start(self, tenant, session_id: str, body: DreamRequest) -> Run:
        from onthejob.dream.run import Budget, DreamOptions

        try:
            budget = Budget.parse(body.budget)
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_value", "budget") from None
        self.ctx.store.get_session(tenant, session_id)  # NotFound -> 404 for foreign sessions
        with self._count:
            if self._pending >= self.max_pending:
                raise APIError(503, f"{self._pending} dreams are already waiting; try later",
                               "server_busy")
            self._pending += 1
        opts = DreamOptions(mode=body.mode, budget=budget, checker=body.checker)
        run = self.ctx.store.create_run("dream", tenant, params={
            "session": session_id, "mode": body.mode, "budget": str(budget),
            "checker": body.checker})
        run = self.ctx.store.update_run(run.id, progress={"phase": "queued"})
        self._pool.submit(self._work, tenant.name, session_id, opts, run.id)
        return run

    def _model(self):
        if self._lm is None:
            with self.ctx.engine.lock:
                # The fast decoder's prepacked weights cannot be copied (and are derived):
                # the copy builds its own on first use.
                lm = self.ctx.lm
                cache, lm.decoder_cache = lm.decoder_cache, None
                try:
                    self._lm = copy.deepcopy(lm)
                finally:
                    lm.decoder_cache = cache
        return self._lm

    def _work(self, tenant: str, session_id: str, opts, run_id: int) -> None:
        from onthejob.dream.run import dream

        try:
            # in a thread that ends, so that the pool's thread keeps no OpenMP helpers that
            # would slow the engine thread afterwards (model/threads.py)
            run_in_thread(lambda: dream(self.ctx.store, self._model(), tenant, session_id, opts,
                                        say=lambda s: log.info("dream %s: %s", run_id, s),
                                        run_id=run_id), "onthejob-dream")
        except Exception as exc:  # noqa: BLE001 - recorded on the run, which the client polls
            log.exception("dream run %s failed", run_id)
            if self.ctx.store.get_run(run_id).status != "failed":
                self.ctx.store.update_run(run_id, status="failed", progress={"phase": "failed"},
                                          error=f"{type(exc).__name__}: {exc}\n"
                                          + traceback.format_exc(limit=3))
        finally:
            with self._count:
                self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def dream_json(run: Run) -> dict[str, Any]:
    from onthejob.dream.run import load_dream

    out = {"object": "dream", "id": run.id, "session": run.params.get("session"),
           "status": run.status, "phase": run.progress.get("phase"), "progress": run.progress,
           "params": run.params, "error": (run.error or "").splitlines()[0] if run.error else None,
           "started_at": run.started_at.isoformat() if run.started_at else None,
           "ended_at": run.ended_at.isoformat() if run.ended_at else None}
    try:
        record = load_dream(run.id)
    except FileNotFoundError:
        return out
    out["tasks"] = [{"question": t["question"], "answers": t["answers"], "checker": t["checker"],
                     "program": t["program"], "source": t.get("source", "model"),
                     "passed": t["gate"]["passed"], "reason": t["gate"]["reason"]}
                    for t in record["tasks"]]
    out["dropped"] = [{"problem": t["problem"], "raw": t["raw"], "attempt": t.get("attempt", 0)}
                      for t in record["dropped"]]
    out["counts"] = record.get("counts")
    out["outcome"] = record.get("outcome")
    return out


def add_dream_routes(app: FastAPI, ctx: ServerContext, principal) -> DreamJobs:
    jobs = DreamJobs(ctx)
    app.router.on_shutdown.append(jobs.close)

    def own_run(run_id: int, who: Principal) -> Run:
        try:
            run = ctx.store.get_run(run_id)
        except NotFound:
            run = None
        if run is None or run.kind != "dream" or run.tenant != who.tenant.name:
            raise APIError(404, f"no dream {run_id} for this API key", "dream_not_found")
        return run

    @app.post("/v1/sessions/{session_id}/dream", status_code=202)
    async def start_dream(session_id: str, request: Request,
                          who: Principal = Depends(principal)) -> JSONResponse:
        body = await read_json(request, DreamRequest, ctx.limits.max_body_bytes)
        try:
            run = jobs.start(who.tenant, session_id, body)
        except NotFound:
            raise APIError(404, f"no session {session_id!r} for this API key",
                           "session_not_found") from None
        return JSONResponse(dream_json(run), status_code=202,
                            headers={"Location": f"/v1/dreams/{run.id}"})

    @app.get("/v1/dreams")
    def list_dreams(who: Principal = Depends(principal)) -> dict:
        runs = ctx.store.list_runs(kind="dream", tenant=who.tenant, limit=100)
        return {"object": "list", "data": [dream_json(r) for r in runs]}

    @app.get("/v1/dreams/{run_id}")
    def get_dream(run_id: int = Path(ge=1, le=2**53), who: Principal = Depends(principal)) -> dict:
        return dream_json(own_run(run_id, who))

    return jobs
