"""The OpenAPI document: routes read their JSON bodies themselves (to answer 413 and invalid
UTF-8 precisely), so their body schemas, the bearer scheme and the session header are added
here, for clients and for schema-driven testing (e.g. schemathesis)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from onthejob.serve.dreams import DreamRequest
from onthejob.serve.schemas import (
    ChatRequest,
    KeyCreate,
    ReviewRequest,
    SessionCreate,
    TenantCreate,
    TenantUpdate,
)

BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/chat/completions", "post"): ChatRequest,
    ("/v1/sessions", "post"): SessionCreate,
    ("/v1/sessions/{session_id}/review", "post"): ReviewRequest,
    ("/v1/admin/tenants", "post"): TenantCreate,
    ("/v1/admin/tenants/{name}/keys", "post"): KeyCreate,
    ("/v1/admin/tenants/{name}", "patch"): TenantUpdate,
    ("/v1/sessions/{session_id}/dream", "post"): DreamRequest,
}
ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"},
    "param": {"type": ["string", "null"]}}}}}


def install(app: FastAPI, session_header: str) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas["Error"] = ERROR
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for (path, method), model in BODIES.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            operation = doc["paths"][path][method]
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        for path, operations in doc["paths"].items():
            for method, operation in operations.items():
                if path != "/health":
                    operation["security"] = [{"bearer": []}]
                operation.setdefault("responses", {})["4XX"] = {
                    "description": "refused; the body says why",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                if (path, method) == ("/v1/chat/completions", "post"):
                    operation.setdefault("parameters", []).append({
                        "name": session_header, "in": "header", "required": False,
                        "schema": {"type": "string"},
                        "description": "continue this session (or send metadata.session_id); "
                        "without either a new session starts. The response carries the id."})
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
