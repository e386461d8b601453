"""Request plumbing shared by the routes: the server's context, reading a JSON body with a
size limit and strict UTF-8, and bearer-key authentication."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from onthejob.model import LoadedModel
from onthejob.serve.engine import Engine
from onthejob.serve.errors import APIError
from onthejob.serve.schemas import validation_message
from onthejob.serve.turns import DEFAULT_KEEP_TOP_K, AdapterResolver, TokenText
from onthejob.store import Store, Tenant

Model = TypeVar("Model", bound=BaseModel)


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    max_tokens: int | None = None  # None: the model's context length


@dataclass
class ServerContext:
    lm: LoadedModel
    store: Store
    engine: Engine
    adapters: AdapterResolver
    limits: Limits
    # Top log-probs kept per token of every stored answer, for learning (0: none).
    keep_top_k: int = DEFAULT_KEEP_TOP_K
    token_text: TokenText | None = None

    def __post_init__(self) -> None:
        if self.token_text is None:
            self.token_text = TokenText(self.lm.tokenizer)

    @property
    def model_ids(self) -> tuple[str, ...]:
        return (self.lm.name, "default")


@dataclass(frozen=True)
class Principal:
    tenant: Tenant | None  # None: an operator key (manages tenants, belongs to none)
    is_admin: bool

    @property
    def is_operator(self) -> bool:
        return self.tenant is None


def _check_strings(value: Any, where: str = "body") -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise APIError(400, f"{where} contains a NUL character", "invalid_value", where)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where} contains an unpaired surrogate (\\ud800-\\udfff); "
                           "send valid Unicode text", "invalid_value", where) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, where)
            _check_strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{where}[{i}]")


async def read_json(request: Request, schema: type[Model], limit: int) -> Model:
    """The body as `schema`, or an APIError: 413 too large, 400 not UTF-8 / not JSON / invalid."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413, f"the body is larger than the limit of {limit} bytes",
                       "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the body is larger than the limit of {limit} bytes",
                           "request_too_large")
    if not body.strip():
        raise APIError(400, "the body is empty: send a JSON object", "invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the body is not valid UTF-8 (bad byte at offset {exc.start})",
                       "invalid_utf8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                       "invalid_json") from None
    except RecursionError:
        raise APIError(400, "malformed JSON: nested too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_json")
    _check_strings(data)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, "invalid_value", param) from None


def authenticate(ctx: ServerContext, request: Request) -> Principal:
    """The caller's tenant from `Authorization: Bearer <key>`, or a 401."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>' "
                       "(create a key with `onthejob keys add --tenant NAME`)", "missing_api_key")
    found = ctx.store.authenticate(key.strip())
    if found is None:
        raise APIError(401, "invalid or revoked API key", "invalid_api_key")
    return Principal(*found)
