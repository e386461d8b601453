"""Bad input beyond tests/test_serve.py's table: every body-taking endpoint refuses invalid
UTF-8, oversized bodies (declared or chunked without a length), unknown fields and wrong types
with a clear 4xx; sampling values at the edges; streaming requests are refused before the
stream starts; and nothing refused is stored."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from onthejob.serve.app import create_app
from onthejob.serve.http import Limits
from onthejob.store import Store

BODY_ENDPOINTS = ["/v1/chat/completions", "/v1/sessions", "/v1/sessions/{sid}/review",
                  "/v1/admin/tenants", "/v1/admin/tenants/acme/keys"]


@pytest.fixture
def api(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'bad.db'}")
    store.create_tenant("acme")
    key = store.create_key("acme", admin=True)
    sid = store.create_session("acme", "s").id
    app = create_app(tiny_lm, store, limits=Limits(max_body_bytes=4096, default_max_tokens=4))
    # Creating tenants takes an operator key; acme's admin key does the rest.
    app.state.operator_auth = {"Authorization": f"Bearer {store.create_operator_key()}"}
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, store, {"Authorization": f"Bearer {key}"}, sid, tiny_lm.name
    store.close()


def _rows(store: Store) -> tuple[int, int, int, int]:
    with store.engine.connect() as conn:
        return tuple(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                     for t in ("messages", "sessions", "tenants", "api_keys"))


def _chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_every_body_endpoint_refuses_malformed_bodies(api):
    client, store, auth, sid, _ = api
    before = _rows(store)
    cases = [
        (b'{"name": "\xc3\x28"}', 400, "invalid_utf8"),
        (b"\xef\xbb\xbf{}", 400, "invalid_json"),  # a byte-order mark is not JSON
        (b'{"unknown_field": 1, "verdict": "up", "name": "x"}', 400, "invalid_value"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, 413, "request_too_large"),
        (b'[' * 1500 + b']' * 1500, 400, "invalid_json"),
        (b'"just a string"', 400, "invalid_json"),
        (b"null", 400, "invalid_json"),
        (json.dumps({"x": "y" * 5000}).encode(), 413, "request_too_large"),
    ]
    for path in BODY_ENDPOINTS:
        url = path.format(sid=sid)
        key = client.app.state.operator_auth if url == "/v1/admin/tenants" else auth
        for body, status, code in cases:
            r = client.post(url, content=body, headers={**key, "Content-Type": "application/json"})
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (url, body[:40], r.text)
        # Too large without a Content-Length (chunked): still refused, by counting.
        r = client.post(url, content=_chunks(b"x" * 10_000), headers=key)
        assert r.status_code == 413, (url, r.text)
    assert _rows(store) == before


@pytest.mark.parametrize("field,value", [
    ("top_p", -0.5), ("top_p", 1.5), ("top_p", 1e308), ("temperature", -1e-9),
    ("temperature", 1e308), ("max_tokens", -1), ("max_tokens", 2**70), ("max_tokens", 3.5),
    ("max_tokens", "8"), ("max_tokens", True), ("max_completion_tokens", 10**9), ("seed", -1),
    ("seed", 2**64), ("stream", "yes"), ("stop", [""]), ("stop", "x" * 65), ("n", 2),
    ("presence_penalty", 1.0), ("logprobs", "yes"), ("logprobs", 1), ("top_logprobs", 3),
    ("top_logprobs", True), ("response_format", {"type": "json_object"}),
    ("metadata", {"session_id": 7}), ("messages", [{"role": "user", "content": "hi"}] * 1025),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
    ("messages", [{"role": "user"}, {"role": "user", "content": "x", "extra": 1}]),
])
def test_out_of_range_or_mistyped_values_are_clear_400s(api, field, value):
    client, store, auth, _, model = api
    client.app.state.ctx.limits.max_body_bytes = 1 << 20  # room for the 1025 messages
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], field: value}
    before = _rows(store)
    r = client.post("/v1/chat/completions", json=body, headers=auth)
    assert r.status_code == 400, (field, value, r.text)
    error = r.json()["error"]
    assert error["code"] == "invalid_value" and error["message"], error
    assert _rows(store) == before


def test_streamed_requests_are_refused_before_the_stream_starts(api):
    client, store, auth, sid, model = api
    client.app.state.ctx.limits.max_body_bytes = 1 << 20
    before = _rows(store)
    for body in ({"messages": [{"role": "user", "content": "word " * 1200}]},
                 {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1020},
                 {"messages": [{"role": "user", "content": "hi"}], "temperature": -2}):
        r = client.post("/v1/chat/completions", headers=auth,
                        json={"model": model, "stream": True, **body})
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] in ("context_length_exceeded", "invalid_value")
    # Past the context in an existing session: the session's history counts too.
    store.add_message("acme", sid, "user", "word " * 1000)
    r = client.post("/v1/chat/completions", headers={**auth, "X-Session-Id": sid},
                    json={"model": model, "stream": True, "max_tokens": 200,
                          "messages": [{"role": "user", "content": "and?"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert _rows(store)[0] == before[0] + 1  # only the message added directly


def test_bad_query_and_path_values_are_4xx(api):
    client, _, auth, _, _ = api
    for query in ("limit=0", "limit=1001", "limit=abc", "offset=-1", f"offset={2**70}",
                  "status=deleted", "limit=1e3"):
        r = client.get(f"/v1/sessions?{query}", headers=auth)
        assert 400 <= r.status_code < 500, (query, r.text)
    for name in ("NOPE", "x" * 300, "%00", "..", "a b"):
        r = client.post(f"/v1/admin/tenants/{name}/keys", json={}, headers=auth)
        assert 400 <= r.status_code < 500, (name, r.text)
    r = client.post("/v1/admin/tenants", json={"name": "Bad Name!"},
                    headers=client.app.state.operator_auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
