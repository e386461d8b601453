"""Tenant isolation over HTTP, by every endpoint and by id guessing: another tenant's session
is indistinguishable from a missing one (the same 404, byte for byte); adapters are served
only to their tenant (and the shared one only to tenants that allow it); admin endpoints
need an admin key; keys made over the API are stored hashed."""

from __future__ import annotations

import re

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import text

from onthejob.learn.consolidate import ConsolidateOptions, _eligible
from onthejob.model import adapters as model_adapters
from onthejob.model import tiny_model
from onthejob.serve.app import create_app
from onthejob.serve.http import Limits
from onthejob.serve.turns import AdapterResolver
from onthejob.store import Store

UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def world(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'iso.db'}")
    for name in ("acme", "globex"):
        store.create_tenant(name)
    keys = {"acme": store.create_key("acme"), "globex": store.create_key("globex"),
            "globex-admin": store.create_key("globex", admin=True)}
    app = create_app(tiny_lm, store, limits=Limits(default_max_tokens=4, max_tokens=8))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", headers=_auth(keys["acme"]), json={
            "model": tiny_lm.name, "max_tokens": 4,
            "messages": [{"role": "user", "content": "acme's secret: the vault code is 7341"}]})
        assert r.status_code == 200
        yield client, store, keys, r.headers["x-session-id"], tiny_lm.name
    store.close()


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _without_id(body: str) -> str:
    return re.sub(r"no session .* for this API key", "no session ID for this API key", body)


def _guesses(sid: str) -> list[str]:
    """A's real id and the spellings of it that a sloppy lookup might accept."""
    return [sid, sid.upper(), "{" + sid + "}", f"urn:uuid:{sid}", sid.replace("-", ""),
            f" {sid}", sid + "%00", f"{sid}' OR '1'='1"]


def _requests(client, key, sid, model):
    yield "GET session", client.get(f"/v1/sessions/{sid}", headers=_auth(key))
    yield "review", client.post(f"/v1/sessions/{sid}/review", headers=_auth(key),
                                json={"verdict": "down", "text": "poison"})
    yield "end", client.post(f"/v1/sessions/{sid}/end", headers=_auth(key))
    yield "compact", client.post(f"/v1/sessions/{sid}/compact", headers=_auth(key))
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    yield "chat header", client.post("/v1/chat/completions", json=body,
                                     headers={**_auth(key), "X-Session-Id": sid})
    yield "chat metadata", client.post("/v1/chat/completions", headers=_auth(key),
                                       json={**body, "metadata": {"session_id": sid}})
    yield "chat stream", client.post("/v1/chat/completions", headers=_auth(key),
                                     json={**body, "stream": True, "metadata": {"session_id": sid}})


def test_foreign_sessions_look_exactly_like_missing_ones(world):
    client, store, keys, sid, model = world
    before = [(m.role, m.content) for m in store.messages("acme", sid)]
    for key in (keys["globex"], keys["globex-admin"]):  # an admin key is no master key
        assert client.get("/v1/sessions", headers=_auth(key)).json()["data"] == []
        for status in ("open", "ended"):
            r = client.get(f"/v1/sessions?status={status}&limit=1000", headers=_auth(key))
            assert r.json()["data"] == []
        for guess in _guesses(sid):
            for (name, foreign), (_, missing) in zip(_requests(client, key, guess, model),
                                                     _requests(client, key, UNKNOWN, model),
                                                     strict=True):
                assert foreign.status_code in (404, 400), (name, guess, foreign.text)
                assert foreign.status_code == missing.status_code, (name, guess)
                assert "x-session-id" not in foreign.headers
                assert "7341" not in foreign.text
                if foreign.status_code == 404:
                    assert _without_id(foreign.text) == _without_id(missing.text)
    # Nothing that B tried changed A's session.
    assert [(m.role, m.content) for m in store.messages("acme", sid)] == before
    assert store.get_review("acme", sid) is None
    assert store.get_session("acme", sid).status == "open"
    # A still reaches it, under its canonical id only.
    assert client.get(f"/v1/sessions/{sid}", headers=_auth(keys["acme"])).status_code == 200
    assert client.get(f"/v1/sessions/{sid.upper()}", headers=_auth(keys["acme"])).status_code == 404


def test_admin_endpoints_need_an_admin_key_and_keys_are_stored_hashed(world):
    client, store, keys, _, _ = world
    tenant_key = _auth(keys["acme"])
    assert client.get("/v1/admin/tenants", headers=tenant_key).status_code == 403
    assert client.post("/v1/admin/tenants", json={"name": "evil"}, headers=tenant_key).status_code == 403
    r = client.post("/v1/admin/tenants/acme/keys", json={"admin": True}, headers=tenant_key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    assert [t.name for t in store.list_tenants()] == ["acme", "globex"]
    admin = _auth(keys["globex-admin"])
    made = client.post("/v1/admin/tenants", json={"name": "initech"}, headers=admin).json()["api_key"]
    extra = client.post("/v1/admin/tenants/acme/keys", json={}, headers=admin).json()["api_key"]
    assert store.authenticate(made)[0].name == "initech"
    assert store.authenticate(extra) == (store.get_tenant("acme"), False)
    with store.engine.connect() as conn:
        dump = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row)
    for key in (*keys.values(), made, extra):
        assert key not in dump and key[12:] not in dump  # only a short display prefix is kept
    revoked = store.revoke_key("acme", keys["acme"][:12])
    assert revoked == 1
    r = client.get("/v1/sessions", headers=tenant_key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def _write_adapter(target, seed: int) -> str:
    lm = tiny_model(seed=0)
    model_adapters.attach(lm, "fresh", model_adapters.LoraSpec(rank=2, alpha=64))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model_adapters.save(lm.model, "fresh", target)


def test_adapters_reach_only_their_tenant_and_shared_only_by_consent(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    store.create_tenant("acme", allow_shared=True)
    store.create_tenant("globex")  # has not agreed to shared learning
    store.create_tenant("initech", allow_shared=True)
    own = store.add_adapter("tenant", "acme", method="t", path=str(tmp_path / "acme"),
                            checksum=_write_adapter(tmp_path / "acme", 1))
    store.activate_adapter(own.id)
    shared = store.add_adapter("shared", None, method="t", path=str(tmp_path / "shared"),
                               checksum=_write_adapter(tmp_path / "shared", 2))
    store.activate_adapter(shared.id)
    resolver = AdapterResolver(store)
    paths = {t: resolver.paths(store.get_tenant(t)) for t in ("acme", "globex", "initech")}
    assert paths == {"acme": [shared.path, own.path], "globex": [], "initech": [shared.path]}
    # Guessing an adapter id gets nothing either.
    with pytest.raises(Exception, match="no adapter"):
        store.get_adapter(own.id, tenant="globex")
    # Shared learning only draws on tenants that allowed it; tenant learning on its own.
    sessions = {}
    for name in ("acme", "globex", "initech"):
        s = store.create_session(name, title=name)
        store.add_message(name, s.id, "user", f"{name} says hi")
        store.set_review(name, s.id, "up")
        sessions[name] = s.id
    shared_pool = {s.id for s in _eligible(store, "acme", ConsolidateOptions(scope="shared"))}
    assert shared_pool == {sessions["acme"], sessions["initech"]}
    assert [s.id for s in _eligible(store, "globex", ConsolidateOptions())] == [sessions["globex"]]
    with pytest.raises(ValueError, match="not eligible"):
        _eligible(store, "globex", ConsolidateOptions(session_ids=[sessions["acme"]]))
    store.close()
