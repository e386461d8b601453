"""Tenant isolation over HTTP, by every endpoint and by id guessing: another tenant's session
is indistinguishable from a missing one (the same 404, byte for byte); adapters are served
only to their tenant (and the shared one only to tenants that allow it); admin endpoints
need an admin key, and a tenant's admin key manages only its own tenant (every admin route
refuses it anything else with a 403) while tenants are managed with an operator key; keys made
over the API are stored hashed; withdrawn consent keeps a tenant out of shared learning."""

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


# Every admin route, aimed at another tenant (`{name}`) or at all tenants. Kept equal to the
# app's own list of /v1/admin routes by test_the_admin_route_list_is_complete.
ADMIN_ROUTES = [
    ("GET", "/v1/admin/tenants", None),
    ("POST", "/v1/admin/tenants", {"name": "initech"}),
    ("GET", "/v1/admin/tenants/{name}", None),
    ("PATCH", "/v1/admin/tenants/{name}", {"allow_shared": True}),
    ("GET", "/v1/admin/tenants/{name}/keys", None),
    ("POST", "/v1/admin/tenants/{name}/keys", {"admin": True}),
    ("DELETE", "/v1/admin/tenants/{name}/keys/{prefix}", None),
]


def cross_tenant_statuses(client, admin_key: str, victim: str, prefix: str) -> list[tuple]:
    """(method, path, status, code) for a tenant admin key aimed at `victim` on every route."""
    out = []
    for method, path, body in ADMIN_ROUTES:
        url = path.format(name=victim, prefix=prefix)
        r = client.request(method, url, json=body, headers=_auth(admin_key))
        code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
        out.append((method, path, r.status_code, code))
    return out


def test_the_admin_route_list_is_complete(world):
    client = world[0]
    served = {(method, route.path) for route in client.app.routes
              if getattr(route, "path", "").startswith("/v1/admin")
              for method in route.methods - {"HEAD", "OPTIONS"}}
    assert served == {(method, path) for method, path, _ in ADMIN_ROUTES}


def test_a_tenant_admin_key_is_refused_every_other_tenant_on_every_admin_route(world):
    client, store, keys, _, _ = world
    acme_keys = store.list_keys("acme")
    for victim in ("acme", "nosuch"):  # an unknown tenant is refused the same: no probing
        statuses = cross_tenant_statuses(client, keys["globex-admin"], victim, keys["acme"][:12])
        refused = [s for s in statuses if s[2] == 403]
        assert refused == statuses, [s for s in statuses if s[2] != 403]
        assert {s[3] for s in statuses} <= {"tenant_forbidden", "operator_required"}
    # Nothing was made, changed or revoked.
    assert [t.name for t in store.list_tenants()] == ["acme", "globex"]
    assert store.list_keys("acme") == acme_keys
    assert store.get_tenant("acme").allow_shared is False
    r = client.post("/v1/admin/tenants/acme/keys", json={}, headers=_auth(keys["globex-admin"]))
    assert "operator" in r.json()["error"]["message"]  # it says what would be allowed


def test_a_tenant_admin_manages_its_own_keys_and_consent(world):
    client, store, keys, _, _ = world
    admin = _auth(keys["globex-admin"])
    assert client.get("/v1/admin/tenants/globex", headers=admin).json()["name"] == "globex"
    made = client.post("/v1/admin/tenants/globex/keys", json={}, headers=admin).json()
    assert store.authenticate(made["api_key"]) == (store.get_tenant("globex"), False)
    listed = client.get("/v1/admin/tenants/globex/keys", headers=admin).json()["data"]
    assert [k["prefix"] for k in listed] == [k.prefix for k in store.list_keys("globex")]
    assert made["api_key"] not in str(listed)
    r = client.delete(f"/v1/admin/tenants/globex/keys/{made['api_key'][:12]}", headers=admin)
    assert r.status_code == 200 and r.json()["revoked"] == 1
    assert store.tenant_for_key(made["api_key"]) is None
    r = client.patch("/v1/admin/tenants/globex", json={"allow_shared": True}, headers=admin)
    assert r.status_code == 200 and r.json()["allow_shared"] is True
    assert store.get_tenant("globex").allow_shared is True
    # A plain tenant key reaches no admin route, its own tenant's included.
    for method, path, body in ADMIN_ROUTES:
        r = client.request(method, path.format(name="acme", prefix="otj-xxxxxxxx"), json=body,
                           headers=_auth(keys["acme"]))
        assert (r.status_code, r.json()["error"]["code"]) == (403, "admin_required"), path


def test_the_operator_key_manages_tenants_and_reaches_no_sessions(world):
    client, store, keys, sid, model = world
    operator = _auth(store.create_operator_key())
    made = client.post("/v1/admin/tenants", json={"name": "initech"}, headers=operator).json()
    assert store.authenticate(made["api_key"])[0].name == "initech"
    names = [t["name"] for t in client.get("/v1/admin/tenants", headers=operator).json()["data"]]
    assert names == ["acme", "globex", "initech"]
    extra = client.post("/v1/admin/tenants/acme/keys", json={"admin": True}, headers=operator)
    assert store.authenticate(extra.json()["api_key"]) == (store.get_tenant("acme"), True)
    assert client.get("/v1/admin/tenants/nosuch/keys", headers=operator).status_code == 404
    # Bound to no tenant: no sessions, no chat, no dreams.
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for r in (client.get("/v1/sessions", headers=operator),
              client.get(f"/v1/sessions/{sid}", headers=operator),
              client.post("/v1/chat/completions", json=body, headers=operator),
              client.get("/v1/dreams", headers=operator)):
        assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_key_required"
        assert "7341" not in r.text


def test_keys_are_stored_hashed_and_revoked_keys_stop_working(world):
    client, store, keys, _, _ = world
    operator = store.create_operator_key()
    made = client.post("/v1/admin/tenants", json={"name": "initech"},
                       headers=_auth(operator)).json()["api_key"]
    extra = client.post("/v1/admin/tenants/globex/keys", json={},
                        headers=_auth(keys["globex-admin"])).json()["api_key"]
    with store.engine.connect() as conn:
        dump = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row)
    for key in (*keys.values(), made, extra, operator):
        assert key not in dump and key[12:] not in dump  # only a short display prefix is kept
    revoked = store.revoke_key("acme", keys["acme"][:12])
    assert revoked == 1
    r = client.get("/v1/sessions", headers=_auth(keys["acme"]))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert store.revoke_operator_key(operator[:12]) == 1
    r = client.get("/v1/admin/tenants", headers=_auth(operator))
    assert r.status_code == 401


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


def test_withdrawn_consent_keeps_later_sessions_out_of_shared_learning(world, tmp_path):
    from onthejob.learn.consolidate import consolidate

    client, store, keys, _, model = world
    admin = _auth(keys["globex-admin"])
    shared = store.add_adapter("shared", None, method="t", path=str(tmp_path / "shared"),
                               checksum=_write_adapter(tmp_path / "shared", 3))
    store.activate_adapter(shared.id)
    resolver = AdapterResolver(store)

    def approved_session(text: str) -> str:
        r = client.post("/v1/chat/completions", headers=_auth(keys["globex"]), json={
            "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": text}]})
        sid = r.headers["x-session-id"]
        client.post(f"/v1/sessions/{sid}/review", headers=_auth(keys["globex"]),
                    json={"verdict": "up"})
        return sid

    def shared_pool() -> list[str]:
        plan = consolidate(store, tiny_model(seed=0), "globex",
                           ConsolidateOptions(scope="shared", dry_run=True), say=lambda s: None)
        return plan.sessions

    assert client.patch("/v1/admin/tenants/globex", json={"allow_shared": True},
                        headers=admin).json()["allow_shared"] is True
    first = approved_session("globex's release train leaves on Fridays")
    assert shared_pool() == [first]
    assert resolver.paths(store.get_tenant("globex")) == [shared.path]
    r = client.patch("/v1/admin/tenants/globex", json={"allow_shared": False}, headers=admin)
    assert r.status_code == 200 and r.json()["allow_shared"] is False
    later = approved_session("globex's staging database is called tern")
    assert shared_pool() == []  # neither the later session nor the one not yet learned
    assert [s.id for s in _eligible(store, "globex", ConsolidateOptions())] == [first, later]
    assert resolver.paths(store.get_tenant("globex")) == []  # nor served the shared adapter
    with pytest.raises(ValueError, match="not eligible"):
        _eligible(store, "globex", ConsolidateOptions(scope="shared", session_ids=[later]))
