"""Dreams through the server (a background job, tenant-scoped progress) and `/dream` in chat."""

from __future__ import annotations

import io
import time

import pytest
from fastapi.testclient import TestClient

from onthejob.serve.app import create_app
from onthejob.serve.chat import ChatSettings, run_chat
from onthejob.serve.engine import Engine
from onthejob.store import Store

FACTS = "Bluefin ships on March 3 in Oslo. Its lead engineer is Ada Lind."


@pytest.fixture
def server(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    store.create_tenant("acme")
    store.create_tenant("globex")
    keys = {"acme": store.create_key("acme"), "globex": store.create_key("globex")}
    s = store.create_session("acme", title="Bluefin")
    store.add_message("acme", s.id, "user", f"Remember: {FACTS}")
    store.add_message("acme", s.id, "assistant", "Noted.")
    with TestClient(create_app(tiny_lm, store)) as client:
        yield client, store, keys, s.id
    store.close()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_dream_endpoint_runs_a_background_job_scoped_to_its_tenant(server):
    client, store, keys, sid = server
    r = client.post(f"/v1/sessions/{sid}/dream", json={"budget": "1steps"},
                    headers=auth(keys["acme"]))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["object"] == "dream" and job["session"] == sid
    assert r.headers["location"] == f"/v1/dreams/{job['id']}"
    # Another tenant sees neither the session nor the dream.
    assert client.post(f"/v1/sessions/{sid}/dream", json={},
                       headers=auth(keys["globex"])).status_code == 404
    assert client.get(f"/v1/dreams/{job['id']}", headers=auth(keys["globex"])).status_code == 404
    assert client.get("/v1/dreams", headers=auth(keys["globex"])).json()["data"] == []
    deadline = time.time() + 120
    while time.time() < deadline:
        status = client.get(f"/v1/dreams/{job['id']}", headers=auth(keys["acme"])).json()
        if status["status"] != "running":
            break
        time.sleep(0.5)
    assert status["status"] == "done", status
    # The tiny random model writes no usable question: each answer span was tried 3 times
    # (every failure kept) and then became a rule-made question, labeled as such; none passed.
    assert status["counts"]["units"] == len(status["tasks"]) >= 2
    assert len(status["dropped"]) == 3 * status["counts"]["units"] == status["counts"]["written"]
    assert {t["source"] for t in status["tasks"]} == {"rule"}
    assert [d["attempt"] for d in status["dropped"]][-1] == 2
    assert status["outcome"]["status"] == "nothing" and status["phase"] == "done"
    listed = client.get("/v1/dreams", headers=auth(keys["acme"])).json()["data"]
    assert [d["id"] for d in listed] == [job["id"]]
    assert store.get_run(job["id"]).kind == "dream"


def test_dream_endpoint_refuses_bad_requests(server):
    client, _, keys, sid = server
    h = auth(keys["acme"])
    assert client.post(f"/v1/sessions/{sid}/dream", json={"budget": "lots"},
                       headers=h).json()["error"]["param"] == "budget"
    assert client.post(f"/v1/sessions/{sid}/dream", json={"mode": "dance"},
                       headers=h).status_code == 400
    assert client.post(f"/v1/sessions/{sid}/dream", json={"bogus": 1}, headers=h).status_code == 400
    assert client.post("/v1/sessions/nope/dream", json={}, headers=h).status_code == 404
    assert client.get("/v1/dreams/999", headers=h).status_code == 404
    assert client.get("/v1/dreams/99999999999999999999", headers=h).status_code in (400, 404, 422)
    assert client.post(f"/v1/sessions/{sid}/dream", json={}).status_code == 401
    assert "/v1/sessions/{session_id}/dream" in client.get("/openapi.json").json()["paths"]


def test_chat_dream_command(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'chat.db'}")
    store.create_tenant("acme")
    engine = Engine(tiny_lm)
    try:
        out = io.StringIO()
        run_chat(engine, store, "acme", None,
                 stdin=io.StringIO(f"/dream\nRemember: {FACTS}\n/dream ten\n/dream 1steps\n"
                                   "/help\n/end\n"),
                 stdout=out, settings=ChatSettings(max_tokens=4, temperature=0))
    finally:
        engine.close()
    text = out.getvalue()
    assert "say something first" in text and "budget 'ten'" in text
    assert "dreaming about this session: mode opsd, budget 1 steps" in text
    assert "dream run" in text and "nothing" in text and "/dream [BUDGET]" in text
    assert [r.kind for r in store.list_runs(tenant="acme")] == ["dream"]
