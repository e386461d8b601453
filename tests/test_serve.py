"""The HTTP server in-process on the tiny model: OpenAI shapes, sessions, storage before the
answer, every error code, and tenant isolation."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from onthejob.serve.app import create_app
from onthejob.serve.http import Limits
from onthejob.store import Store


@pytest.fixture
def server(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    store.create_tenant("acme")
    store.create_tenant("globex")
    keys = {"acme": store.create_key("acme"), "globex": store.create_key("globex"),
            "admin": store.create_key("acme", admin=True)}
    app = create_app(tiny_lm, store, limits=Limits(max_body_bytes=64_000))
    with TestClient(app) as client:
        yield client, store, keys, tiny_lm.name
    store.close()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def ask(content: str, model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, "temperature": 0, **extra}


def count_messages(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM messages")).scalar()


def test_models_and_health(server):
    client, _, keys, model = server
    assert client.get("/health").json()["status"] == "ok"
    data = client.get("/v1/models", headers=auth(keys["acme"])).json()
    assert data["object"] == "list" and data["data"][0]["id"] == model


def test_completion_is_stored_before_it_returns(server):
    client, store, keys, model = server
    r = client.post("/v1/chat/completions", json=ask("hello there", model),
                    headers=auth(keys["acme"]))
    assert r.status_code == 200, r.text
    body = r.json()
    sid = r.headers["X-Session-Id"]
    assert body["session_id"] == sid and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 8
    stored = store.messages("acme", sid)
    assert [(m.role, m.content) for m in stored] == [
        ("user", "hello there"), ("assistant", choice["message"]["content"])]
    assert stored[1].meta["finish_reason"] == choice["finish_reason"]
    assert store.get_session("acme", sid).title == "hello there"


def test_session_continues_by_header_or_metadata(server):
    client, store, keys, model = server
    first = client.post("/v1/chat/completions", json=ask("one", model), headers=auth(keys["acme"]))
    sid = first.headers["X-Session-Id"]
    answer = first.json()["choices"][0]["message"]["content"]
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": answer},
               {"role": "user", "content": "two"}]
    # An OpenAI-style client resends the whole conversation: only "two" is new.
    r = client.post("/v1/chat/completions", json={**ask("", model), "messages": history},
                    headers={**auth(keys["acme"]), "X-Session-Id": sid})
    assert r.status_code == 200 and r.headers["X-Session-Id"] == sid
    # A stateful client sends only its new turn, naming the session in metadata.
    r = client.post("/v1/chat/completions",
                    json=ask("three", model, metadata={"session_id": sid}),
                    headers=auth(keys["acme"]))
    assert r.json()["session_id"] == sid
    roles = [(m.role, m.content) for m in store.messages("acme", sid)]
    assert [c for role, c in roles if role == "user"] == ["one", "two", "three"]
    assert len(roles) == 6
    r = client.post("/v1/chat/completions",
                    json=ask("x", model, metadata={"session_id": "00000000-0000-4000-8000-000000000000"}),
                    headers={**auth(keys["acme"]), "X-Session-Id": sid})
    assert r.status_code == 400 and "differ" in r.json()["error"]["message"]


def test_streaming_sse(server):
    client, store, keys, model = server
    with client.stream("POST", "/v1/chat/completions", headers=auth(keys["acme"]),
                       json=ask("stream me", model, stream=True,
                                stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        sid = r.headers["X-Session-Id"]
        # The user's message is stored before the first byte is read.
        assert [m.role for m in store.messages("acme", sid)][:1] == ["user"]
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text_out = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] in ("stop", "length") and all(f is None for f in finals[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all(c["session_id"] == sid for c in chunks)
    assert store.messages("acme", sid)[-1].content == text_out


def _post_raw(client, key, content: bytes, headers=None):
    return client.post("/v1/chat/completions", content=content,
                       headers={**auth(key), "Content-Type": "application/json", **(headers or {})})


def test_bad_requests_get_clear_4xx_and_store_nothing(server):
    client, store, keys, model = server
    key = keys["acme"]
    ok = ask("hi", model)
    long_prompt = "word " * 1200
    cases = [
        (_post_raw(client, key, b"{not json"), 400, "invalid_json"),
        (_post_raw(client, key, b""), 400, "invalid_json"),
        (_post_raw(client, key, b"[1, 2]"), 400, "invalid_json"),
        (_post_raw(client, key, b'{"model": "\xff\xfe"}'), 400, "invalid_utf8"),
        (_post_raw(client, key, json.dumps({**ok, "messages": [
            {"role": "user", "content": "\ud800"}]}).encode()), 400, "invalid_value"),
        (_post_raw(client, key, b'{"model": "x", "messages": [{"role": "user", "content": "a\\u0000"}]}'),
         400, "invalid_value"),
        (_post_raw(client, key, b"x" * 70_000), 413, "request_too_large"),
        (_post_raw(client, key, json.dumps({**ok, "bogus": 1}).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps({**ok, "messages": []}).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps({**ok, "messages": [
            {"role": "wizard", "content": "x"}]}).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps({"messages": ok["messages"]}).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps(ask("hi", "gpt-17")).encode()), 404, "model_not_found"),
        (_post_raw(client, key, json.dumps(ask("hi", model, max_tokens=10**12)).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps(ask("hi", model, max_tokens=0)).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps(ask("hi", model, temperature=-1)).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps(ask("hi", model, temperature=1e9)).encode()), 400, "invalid_value"),
        (_post_raw(client, key, b'{"model": "m", "messages": [], "temperature": NaN}'), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps(ask("hi", model, top_p=0)).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps(ask("hi", model, n=3)).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps(ask("hi", model, stop=["a"] * 9)).encode()), 400, "invalid_value"),
        (_post_raw(client, key, json.dumps(ask(long_prompt, model)).encode()), 400, "context_length_exceeded"),
        (_post_raw(client, key, json.dumps(ask("hi", model, max_tokens=1020)).encode()), 400, "context_length_exceeded"),
        (_post_raw(client, key, json.dumps(ask("hi", model)).encode(),
                   {"X-Session-Id": "00000000-0000-4000-8000-000000000000"}), 404, "session_not_found"),
        (_post_raw(client, key, json.dumps(ask("hi", model)).encode(), {"X-Session-Id": "nope"}),
         404, "session_not_found"),
        (_post_raw(client, "otj-wrong", json.dumps(ok).encode()), 401, "invalid_api_key"),
        (client.post("/v1/chat/completions", json=ok), 401, "missing_api_key"),
        (client.get("/v1/nowhere", headers=auth(key)), 404, "http_404"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (code, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"], error
    assert "at most" in cases[20][0].json()["error"]["message"]
    assert "1024" in cases[20][0].json()["error"]["message"]
    assert count_messages(store) == 0
    assert store.list_sessions("acme") == []


def test_ended_session_refuses_new_turns(server):
    client, store, keys, model = server
    sid = client.post("/v1/chat/completions", json=ask("hi", model),
                      headers=auth(keys["acme"])).headers["X-Session-Id"]
    assert client.post(f"/v1/sessions/{sid}/end", headers=auth(keys["acme"])).json()["status"] == "ended"
    before = count_messages(store)
    r = client.post("/v1/chat/completions", json=ask("more", model),
                    headers={**auth(keys["acme"]), "X-Session-Id": sid})
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_ended"
    assert count_messages(store) == before


def test_sessions_reviews_and_isolation(server):
    client, store, keys, model = server
    a, b = auth(keys["acme"]), auth(keys["globex"])
    sid = client.post("/v1/chat/completions", json=ask("secret plan", model), headers=a).headers["X-Session-Id"]
    listed = client.get("/v1/sessions", headers=a).json()["data"]
    assert [s["id"] for s in listed] == [sid] and listed[0]["message_count"] == 2
    detail = client.get(f"/v1/sessions/{sid}", headers=a).json()
    assert detail["messages"][0]["content"] == "secret plan" and detail["review"] is None
    r = client.post(f"/v1/sessions/{sid}/review", json={"verdict": "up", "text": "good"}, headers=a)
    assert r.status_code == 200 and r.json()["verdict"] == "up"
    r = client.post(f"/v1/sessions/{sid}/review", json={"verdict": "down", "text": "no"}, headers=a)
    assert r.json()["verdict"] == "down"
    assert client.post(f"/v1/sessions/{sid}/review", json={"verdict": "meh"}, headers=a).status_code == 400
    # Tenant B: A's session looks exactly like an unknown one, everywhere.
    assert client.get("/v1/sessions", headers=b).json()["data"] == []
    unknown = "00000000-0000-4000-8000-000000000000"
    for path, method, body in (("/v1/sessions/{}", "GET", None),
                               ("/v1/sessions/{}/review", "POST", {"verdict": "up", "text": "x"}),
                               ("/v1/sessions/{}/end", "POST", None),
                               ("/v1/sessions/{}/compact", "POST", None)):
        foreign = client.request(method, path.format(sid), json=body, headers=b)
        missing = client.request(method, path.format(unknown), json=body, headers=b)
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["error"]["message"].replace(sid, unknown) == missing.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=ask("steal", model), headers={**b, "X-Session-Id": sid})
    assert r.status_code == 404
    assert [m.content for m in store.messages("acme", sid)][0] == "secret plan"
    assert store.get_review("acme", sid).verdict == "down"
    assert store.get_session("acme", sid).status == "open"
    # After consolidation the review is frozen.
    store.set_review("acme", sid, "up", "fine")
    adapter = store.add_adapter("tenant", "acme", method="opsd", path="/x", checksum="c")
    store.mark_consolidated("acme", [sid], adapter.id)
    r = client.post(f"/v1/sessions/{sid}/review", json={"verdict": "down"}, headers=a)
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_consolidated"


def test_compact_endpoint_stores_a_summary(server):
    client, store, keys, model = server
    a = auth(keys["acme"])
    sid = client.post("/v1/chat/completions", json=ask("remember 42", model), headers=a).headers["X-Session-Id"]
    r = client.post(f"/v1/sessions/{sid}/compact", headers=a)
    assert r.status_code == 200 and r.json()["kind"] == "compaction"
    assert store.messages("acme", sid)[-1].kind == "compaction"


def test_admin_endpoints_need_an_admin_key(server):
    client, store, keys, _ = server
    assert client.get("/v1/admin/tenants", headers=auth(keys["acme"])).status_code == 403
    operator = auth(store.create_operator_key())
    r = client.post("/v1/admin/tenants", json={"name": "initech"}, headers=operator)
    assert r.status_code == 200
    new_key = r.json()["api_key"]
    assert store.tenant_for_key(new_key).name == "initech"
    assert client.post("/v1/admin/tenants", json={"name": "initech"},
                       headers=operator).status_code == 409
    names = [t["name"] for t in client.get("/v1/admin/tenants", headers=operator).json()["data"]]
    assert names == ["acme", "globex", "initech"]
    r = client.post("/v1/admin/tenants/initech/keys", json={}, headers=operator)
    assert store.tenant_for_key(r.json()["api_key"]).name == "initech"
    # acme's admin key makes acme's keys, and nobody else's (tests/test_isolation.py: all routes)
    r = client.post("/v1/admin/tenants/acme/keys", json={}, headers=auth(keys["admin"]))
    assert store.tenant_for_key(r.json()["api_key"]).name == "acme"
    r = client.post("/v1/admin/tenants/initech/keys", json={}, headers=auth(keys["admin"]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_forbidden"


def test_openapi_document_describes_bodies_auth_and_session_header(server):
    client, *_ = server
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/v1/chat/completions"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatRequest"
    assert "messages" in doc["components"]["schemas"]["ChatRequest"]["properties"]
    assert "ChatMessage" in doc["components"]["schemas"]
    assert any(p["name"] == "X-Session-Id" for p in op["parameters"])
    assert op["security"] == [{"bearer": []}]
    assert "ReviewRequest" in doc["components"]["schemas"]
