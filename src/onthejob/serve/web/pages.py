"""The review page's routes, under /review, on the server's FastAPI app.

  GET  /review/signin, POST /review/signin, POST /review/signout
  GET  /review                               the sessions (?show=unreviewed|open|ended, ?offset)
  GET  /review/sessions/{id}                 a transcript and its review form
  POST /review/sessions/{id}/review          give or change the review (store.set_review)
  GET  /review/learning                      runs with progress, adapter versions, gate charts
  GET|POST /review/learning/adapters/{id}/activate    confirm, then activate a version
  GET|POST /review/learning/rollback         confirm, then roll the active version back
  GET  /review/figures, /review/figures/{name}        the benchmark plots
  GET  /review/static/page.css

Pages are plain HTML forms and links: reading and reviewing need no script, and the
Content-Security-Policy forbids every script. A running consolidation's page reloads itself
(meta refresh) to show the run's progress as its rows change.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader
from pydantic import ValidationError

from onthejob.learn.activation import activate_checked
from onthejob.model.adapters import AdapterError
from onthejob.serve.http import Principal, ServerContext
from onthejob.serve.schemas import ReviewRequest, validation_message
from onthejob.serve.web import auth
from onthejob.serve.web.charts import gate_chart
from onthejob.serve.web.views import decision_words, gate_words, run_view, turn_of, when
from onthejob.store import Adapter, Conflict, NotFound

ROOT = "/review"
PAGE_SIZE = 50
REFRESH_S = 5
RUN_KINDS = ("consolidate", "dream")
FILTERS = {"all": {}, "unreviewed": {"reviewed": False}, "open": {"status": "open"},
           "ended": {"status": "ended"}}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SignInRequired(Exception):  # noqa: N818 - a redirect, not an error
    """Raised by a page whose caller has no valid key cookie: answered by the sign-in page."""


class Refused(Exception):  # noqa: N818 - answered as an error page
    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


_templates = Environment(loader=PackageLoader("onthejob.serve.web", "templates"),
                         autoescape=True, trim_blocks=True, lstrip_blocks=True)
_templates.globals.update(root=ROOT, when=when)


def _page(name: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = _templates.get_template(name).render(**values)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _redirect(path: str, **query: Any) -> RedirectResponse:
    query = {k: v for k, v in query.items() if v is not None}
    url = path + (f"?{urlencode(query)}" if query else "")
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def figure_files(folder: Path | None) -> dict[str, Path]:
    """The PNG plots under `folder`, at any depth (a benchmark's report folder may hold one
    folder per run), by their relative name; none that resolves outside the folder."""
    if folder is None:
        return {}
    root = folder.resolve()
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*.png"))
            if p.is_file() and p.resolve().is_relative_to(root)}


def add_review_pages(app: FastAPI, ctx: ServerContext, figures: Path | None = None) -> None:
    store = ctx.store

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, _exc: SignInRequired) -> Response:
        response = _redirect(f"{ROOT}/signin")
        if request.cookies.get(auth.KEY_COOKIE):
            auth.clear_key_cookie(response, request)  # revoked or unknown: forget it
        return response

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> Response:
        found = await asyncio.to_thread(auth.signed_in, ctx, request)
        return _page("error.html", exc.status, title=exc.title, message=exc.message,
                     who=found[0] if found else None,
                     csrf=auth.csrf_for_key(found[1]) if found else "")

    def require(request: Request) -> tuple[Principal, str]:
        found = auth.signed_in(ctx, request)
        if found is None:
            raise SignInRequired()
        return found

    async def read_form(request: Request) -> dict[str, str]:
        """The posted form's fields (the page's forms are URL-encoded), read up to the size
        limit whether or not the client declared a length."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise Refused(415, "Form refused", "Send the form from the page itself "
                          "(application/x-www-form-urlencoded).")
        limit = ctx.limits.max_body_bytes
        too_large = Refused(413, "Too large", f"The form is larger than the limit of {limit} bytes.")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            pairs = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True,
                              max_num_fields=16)
        except ValueError:
            raise Refused(400, "Form refused", "The form has too many fields.") from None
        return dict(pairs)

    async def checked_form(request: Request, key: str) -> dict[str, str]:
        form = await read_form(request)
        if not auth.tokens_match(str(form.get("csrf", "")), auth.csrf_for_key(key)):
            raise Refused(403, "Form refused", "The form's security token is missing or wrong "
                          "(it was sent from another site, or the page is stale): reload the "
                          "page and send the form again.")
        return form

    def common(who: Principal, key: str, **values: Any) -> dict[str, Any]:
        return {"who": who, "csrf": auth.csrf_for_key(key), **values}

    def no_session(who: Principal, session_id: str) -> Refused:
        return Refused(404, "No such session",
                       f"Tenant {who.tenant.name} has no session {session_id!r}.")

    def session_or_404(who: Principal, session_id: str):
        try:
            return store.get_session(who.tenant, session_id)
        except NotFound:
            raise no_session(who, session_id) from None

    def own_adapter(who: Principal, adapter_id: int) -> Adapter:
        for adapter in store.list_adapters("tenant", who.tenant):
            if adapter.id == adapter_id:
                return adapter
        raise Refused(404, "No such adapter",
                      f"Tenant {who.tenant.name} has no adapter with id {adapter_id}.")

    # --- signing in and out -------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def home() -> Response:
        return _redirect(ROOT)

    @app.get(f"{ROOT}/signin", include_in_schema=False)
    def signin_page(request: Request) -> Response:
        if auth.signed_in(ctx, request):
            return _redirect(ROOT)
        token = auth.new_signin_token()
        response = _page("signin.html", token=token, who=None)
        auth.set_signin_cookie(response, request, token)
        return response

    @app.post(f"{ROOT}/signin", include_in_schema=False)
    async def signin(request: Request) -> Response:
        form = await read_form(request)
        expected = request.cookies.get(auth.SIGNIN_COOKIE)
        if not auth.tokens_match(str(form.get("csrf", "")), expected):
            raise Refused(403, "Form refused", "The sign-in form's security token is missing "
                          "or wrong: open the sign-in page again and send it from there.")
        key = str(form.get("key", "")).strip()
        found = await asyncio.to_thread(store.authenticate, key) if key else None
        if found is None:
            token = auth.new_signin_token()
            response = _page("signin.html", 401, token=token, who=None,
                             error="That key is not valid (unknown or revoked). Ask for one "
                             "with `onthejob keys add --tenant NAME`.")
            auth.set_signin_cookie(response, request, token)
            return response
        response = _redirect(ROOT)
        auth.set_key_cookie(response, request, key)
        response.delete_cookie(auth.SIGNIN_COOKIE, path=auth.COOKIE_PATH)
        return response

    @app.post(f"{ROOT}/signout", include_in_schema=False)
    async def signout(request: Request) -> Response:
        _who, key = require(request)
        await checked_form(request, key)
        response = _redirect(f"{ROOT}/signin")
        auth.clear_key_cookie(response, request)
        return response

    # --- sessions -----------------------------------------------------------------------

    @app.get(ROOT, include_in_schema=False)
    def sessions_page(request: Request, show: str = "all", offset: int = 0) -> Response:
        who, key = require(request)
        if show not in FILTERS:
            raise Refused(400, "Unknown filter", f"show must be one of {', '.join(FILTERS)}.")
        offset = max(0, min(offset, 2**31 - 1))
        found = store.list_sessions(who.tenant, limit=PAGE_SIZE + 1, offset=offset,
                                    **FILTERS[show])
        more, found = len(found) > PAGE_SIZE, found[:PAGE_SIZE]
        reviews = store.reviews_of(who.tenant, [s.id for s in found])
        versions = {a.id: a.version for a in store.list_adapters("tenant", who.tenant)}
        return _page("sessions.html", **common(
            who, key, sessions=found, reviews=reviews, versions=versions, show=show,
            filters=list(FILTERS), offset=offset, more=more, page_size=PAGE_SIZE))

    @app.get(f"{ROOT}/sessions/{{session_id}}", include_in_schema=False)
    def session_page(request: Request, session_id: str, saved: str | None = None) -> Response:
        who, key = require(request)
        session = session_or_404(who, session_id)
        turns = [turn_of(m) for m in store.messages(who.tenant, session.id)]
        review = store.get_review(who.tenant, session.id)
        adapter = store.get_adapter(session.consolidated_adapter_id, who.tenant) \
            if session.consolidated_adapter_id else None
        return _page("session.html", **common(
            who, key, session=session, turns=turns, review=review, adapter=adapter,
            saved=saved in ("up", "down") and saved))

    @app.post(f"{ROOT}/sessions/{{session_id}}/review", include_in_schema=False)
    async def review(request: Request, session_id: str) -> Response:
        who, key = require(request)
        form = await checked_form(request, key)
        text = str(form.get("text", "")).replace("\r\n", "\n")
        try:
            body = ReviewRequest.model_validate({"verdict": str(form.get("verdict", "")),
                                                 "text": text})
        except ValidationError as exc:
            message, _ = validation_message(exc)
            raise Refused(400, "Review not saved", f"Choose thumbs up or down ({message}).") \
                from None
        if "\x00" in body.text:
            raise Refused(400, "Review not saved", "The words contain a NUL character.")
        try:
            await asyncio.to_thread(store.set_review, who.tenant, session_id, body.verdict,
                                    body.text)
        except NotFound:
            raise no_session(who, session_id) from None
        except Conflict as exc:
            raise Refused(409, "Review can no longer change", f"{exc}.") from None
        return _redirect(f"{ROOT}/sessions/{session_id}", saved=body.verdict)

    # --- learning -----------------------------------------------------------------------

    @app.get(f"{ROOT}/learning", include_in_schema=False)
    def learning_page(request: Request, activated: int | None = None,
                      rolled_back: int | None = None) -> Response:
        who, key = require(request)
        runs = [run_view(r) for r in store.list_runs(tenant=who.tenant, limit=50)
                if r.kind in RUN_KINDS]
        adapters = store.list_adapters("tenant", who.tenant)
        versions = {a.id: a.version for a in adapters}
        shared = store.list_adapters("shared") if who.tenant.allow_shared else []
        versions.update({a.id: a.version for a in shared})
        active = next((a for a in adapters if a.status == "active"), None)
        note = None
        if activated is not None:
            note = f"Version {activated} is active; the next request is served with it."
        elif rolled_back is not None:
            note = (f"Rolled back: version {rolled_back} is active." if rolled_back
                    else "Rolled back: no adapter is active, the base model serves.")
        return _page("learning.html", **common(
            who, key, runs=runs, adapters=list(reversed(adapters)), active=active,
            versions=versions, shared=list(reversed(shared)), note=note,
            chart=gate_chart(adapters, f"gate metrics of {who.tenant.name}'s adapter versions"),
            shared_chart=gate_chart(shared, "gate metrics of the shared adapter's versions"),
            gate_words=gate_words, decision_words=decision_words,
            refresh=REFRESH_S if any(r.run.status == "running" for r in runs) else None))

    @app.get(f"{ROOT}/learning/adapters/{{adapter_id}}/activate", include_in_schema=False)
    def confirm_activate(request: Request, adapter_id: int) -> Response:
        who, key = require(request)
        adapter = own_adapter(who, adapter_id)
        active = store.active_adapter(who.tenant)
        return _page("confirm.html", **common(
            who, key, action="activate", adapter=adapter, active=active,
            gate=gate_words(adapter), decision=decision_words(adapter),
            post=f"{ROOT}/learning/adapters/{adapter.id}/activate"))

    @app.post(f"{ROOT}/learning/adapters/{{adapter_id}}/activate", include_in_schema=False)
    async def activate(request: Request, adapter_id: int) -> Response:
        who, key = require(request)
        await checked_form(request, key)
        adapter = own_adapter(who, adapter_id)
        try:
            await asyncio.to_thread(activate_checked, store, adapter,
                                    "activated by hand on the review page")
        except AdapterError as exc:
            raise Refused(409, "Not activated", str(exc)) from None
        return _redirect(f"{ROOT}/learning", activated=adapter.version)

    @app.get(f"{ROOT}/learning/rollback", include_in_schema=False)
    def confirm_rollback(request: Request) -> Response:
        who, key = require(request)
        active = store.active_adapter(who.tenant)
        if active is None:
            raise Refused(409, "Nothing to roll back",
                          "No adapter is active for this tenant: the base model serves.")
        parent = store.get_adapter(active.parent_id) if active.parent_id else None
        return _page("confirm.html", **common(
            who, key, action="rollback", adapter=active, parent=parent,
            gate=gate_words(active), decision=decision_words(active),
            post=f"{ROOT}/learning/rollback"))

    @app.post(f"{ROOT}/learning/rollback", include_in_schema=False)
    async def rollback(request: Request) -> Response:
        who, key = require(request)
        await checked_form(request, key)
        try:
            restored = await asyncio.to_thread(store.rollback_adapter, who.tenant, "tenant",
                                               "rolled back on the review page")
        except NotFound:
            raise Refused(409, "Nothing to roll back",
                          "No adapter is active for this tenant: the base model serves.") from None
        return _redirect(f"{ROOT}/learning", rolled_back=restored.version if restored else 0)

    # --- figures and the style sheet ----------------------------------------------------

    @app.get(f"{ROOT}/figures", include_in_schema=False)
    def figures_page(request: Request) -> Response:
        who, key = require(request)
        return _page("figures.html", **common(who, key, figures=list(figure_files(figures)),
                                              folder=figures))

    @app.get(f"{ROOT}/figures/{{name:path}}", include_in_schema=False)
    def figure(request: Request, name: str) -> Response:
        require(request)
        path = figure_files(figures).get(name)  # only a listed file: no path leaves the folder
        if path is None:
            raise Refused(404, "No such figure", f"There is no figure {name!r}.")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=300",
                                                                    "X-Content-Type-Options": "nosniff"})

    css = resources.files("onthejob.serve.web").joinpath("static/page.css").read_bytes()

    @app.get(f"{ROOT}/static/page.css", include_in_schema=False)
    def stylesheet() -> Response:
        return Response(css, media_type="text/css",
                        headers={"Cache-Control": "public, max-age=3600",
                                 "X-Content-Type-Options": "nosniff"})
