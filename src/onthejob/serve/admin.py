"""The admin routes: tenants, their keys and their consent to shared learning.

Two roles. An operator key (`onthejob keys add --operator`, bound to no tenant) lists and
creates tenants and manages every tenant. A tenant's admin key (`onthejob keys add --tenant
NAME --admin`) manages only its own tenant: its keys and its consent. Anything else is a 403,
an unknown tenant included (so that a tenant admin cannot probe which tenants exist).

  GET    /v1/admin/tenants                         operator: every tenant
  POST   /v1/admin/tenants                         operator: {"name", "allow_shared"} -> a key
  GET    /v1/admin/tenants/{name}                  the tenant
  PATCH  /v1/admin/tenants/{name}                  {"allow_shared": bool}: give or withdraw consent
  GET    /v1/admin/tenants/{name}/keys             its keys (prefixes only)
  POST   /v1/admin/tenants/{name}/keys             {"admin": false} -> a new key
  DELETE /v1/admin/tenants/{name}/keys/{prefix}    revoke the keys with that prefix
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Request

from onthejob.serve.errors import APIError
from onthejob.serve.http import Principal, ServerContext, authenticate, read_json
from onthejob.serve.schemas import KeyCreate, TenantCreate, TenantUpdate
from onthejob.store import Conflict, NotFound

OPERATOR_HINT = "tenants are managed with an operator key (`onthejob keys add --operator`)"


def _plain(value: Any) -> Any:
    data = asdict(value)
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in data.items()}


def add_admin_routes(app: FastAPI, ctx: ServerContext) -> None:
    store = ctx.store

    def admin(request: Request) -> Principal:
        who = authenticate(ctx, request)
        if not who.is_admin:
            raise APIError(403, "this endpoint needs an admin key (`onthejob keys add --tenant "
                           "NAME --admin`, or an operator key)", "admin_required")
        return who

    def operator(who: Principal = Depends(admin)) -> Principal:
        if not who.is_operator:
            raise APIError(403, f"this admin key belongs to tenant {who.tenant.name!r} and "
                           f"manages only that tenant's keys and consent; {OPERATOR_HINT}",
                           "operator_required")
        return who

    def tenant_admin(name: str, who: Principal = Depends(admin)) -> Principal:
        """The operator, or the admin of tenant `name` itself."""
        if not who.is_operator and who.tenant.name != name:
            raise APIError(403, f"this admin key belongs to tenant {who.tenant.name!r} and "
                           f"manages only that tenant; {OPERATOR_HINT}", "tenant_forbidden")
        return who

    def unknown(exc: NotFound) -> APIError:
        return APIError(404, str(exc), "tenant_not_found", "name")

    @app.get("/v1/admin/tenants")
    def tenants(_who: Principal = Depends(operator)) -> dict:
        return {"object": "list", "data": [_plain(t) for t in store.list_tenants()]}

    @app.post("/v1/admin/tenants")
    async def add_tenant(request: Request, _who: Principal = Depends(operator)) -> dict:
        body = await read_json(request, TenantCreate, ctx.limits.max_body_bytes)
        try:
            tenant = await asyncio.to_thread(store.create_tenant, body.name, body.allow_shared)
        except Conflict as exc:
            raise APIError(409, str(exc), "tenant_exists") from None
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_value", "name") from None
        key = await asyncio.to_thread(store.create_key, tenant)
        return {"tenant": _plain(tenant), "api_key": key}

    @app.get("/v1/admin/tenants/{name}")
    def get_tenant(name: str, _who: Principal = Depends(tenant_admin)) -> dict:
        try:
            return _plain(store.get_tenant(name))
        except NotFound as exc:
            raise unknown(exc) from None

    @app.patch("/v1/admin/tenants/{name}")
    async def update_tenant(name: str, request: Request,
                            _who: Principal = Depends(tenant_admin)) -> dict:
        body = await read_json(request, TenantUpdate, ctx.limits.max_body_bytes)
        try:
            tenant = await asyncio.to_thread(store.set_allow_shared, name, body.allow_shared)
        except NotFound as exc:
            raise unknown(exc) from None
        return _plain(tenant)

    @app.get("/v1/admin/tenants/{name}/keys")
    def list_keys(name: str, _who: Principal = Depends(tenant_admin)) -> dict:
        try:
            found = store.list_keys(name)
        except NotFound as exc:
            raise unknown(exc) from None
        return {"object": "list", "data": [_plain(k) for k in found]}

    @app.post("/v1/admin/tenants/{name}/keys")
    async def add_key(name: str, request: Request,
                      _who: Principal = Depends(tenant_admin)) -> dict:
        body = await read_json(request, KeyCreate, ctx.limits.max_body_bytes)
        try:
            key = await asyncio.to_thread(store.create_key, name, body.admin)
        except NotFound as exc:
            raise unknown(exc) from None
        return {"tenant": name, "api_key": key, "admin": body.admin}

    @app.delete("/v1/admin/tenants/{name}/keys/{prefix}")
    def revoke_key(name: str, prefix: str, _who: Principal = Depends(tenant_admin)) -> dict:
        try:
            return {"tenant": name, "revoked": store.revoke_key(name, prefix)}
        except NotFound as exc:
            raise APIError(404, str(exc), "key_not_found") from None
