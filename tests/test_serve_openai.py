"""A real uvicorn server on a loopback port, driven by the official `openai` client."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import uvicorn

from onthejob.serve.app import create_app
from onthejob.store import Store


@pytest.fixture
def live(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'live.db'}")
    store.create_tenant("acme")
    key = store.create_key("acme")
    app = create_app(tiny_lm, store)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", key, store, tiny_lm.name
    server.should_exit = True
    thread.join(timeout=20)
    store.close()


def test_openai_client_round_trip(live):
    base, key, store, model = live
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [model]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    sid = raw.headers["x-session-id"]
    reply = raw.parse()
    text = reply.choices[0].message.content
    assert reply.model == model and reply.usage.completion_tokens <= 6
    assert reply.model_extra["session_id"] == sid
    # The answer row was committed before the response arrived.
    assert [m.content for m in store.messages("acme", sid)] == ["hello", text]

    pieces = []
    events = client.chat.completions.create(
        model=model, stream=True, max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": text},
                  {"role": "user", "content": "again"}],
        extra_headers={"X-Session-Id": sid})
    for chunk in events:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    stored = store.messages("acme", sid)
    assert [m.content for m in stored][:3] == ["hello", text, "again"]
    assert stored[-1].role == "assistant" and stored[-1].content == "".join(pieces)
    assert len(stored) == 4


def test_openai_client_errors(live):
    base, key, _, model = live
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="otj-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=model, max_tokens=10,
                                       messages=[{"role": "user", "content": "word " * 1200}])


def test_client_disconnect_mid_stream_still_stores_the_answer(live, monkeypatch):
    # Generation is held after its first piece until the server has cancelled it (or 60 s
    # passed): it cannot finish before the hang-up, so only a working cancel ends it early.
    from onthejob.serve import engine as engine_module

    cancels: list[threading.Event] = []
    original_submit, real_stream = engine_module.Engine.submit_stream, engine_module.stream

    def submit_stream(self, prompt, params, adapters, on_piece, cancel, then=None):
        cancels.append(cancel)
        return original_submit(self, prompt, params, adapters, on_piece, cancel, then)

    def held_stream(lm, prompt, params):
        for i, item in enumerate(real_stream(lm, prompt, params)):
            yield item
            if i == 0:
                cancels[-1].wait(timeout=60)

    monkeypatch.setattr(engine_module.Engine, "submit_stream", submit_stream)
    monkeypatch.setattr(engine_module, "stream", held_stream)
    base, key, store, model = live
    body = {"model": model, "stream": True, "max_tokens": 50, "temperature": 1.0, "seed": 1,
            "messages": [{"role": "user", "content": "tell me everything"}]}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{base}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {key}"}) as r:
        sid = r.headers["x-session-id"]
        next(r.iter_lines())  # the first event, then hang up
    deadline = time.time() + 60
    while time.time() < deadline:
        stored = store.messages("acme", sid)
        if len(stored) == 2:
            break
        time.sleep(0.1)
    assert [m.role for m in stored] == ["user", "assistant"]
    # The hang-up stopped generation and the partial answer is kept.
    assert cancels and cancels[0].is_set()
    assert stored[1].meta["finish_reason"] == "cancelled"
