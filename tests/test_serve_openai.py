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
    from onthejob.serve.engine import Engine

    cancels: list[threading.Event] = []
    original = Engine.submit_stream

    def submit_stream(self, prompt, params, adapters, on_piece, cancel, then=None):
        pieces = []

        def held(piece):
            on_piece(piece)
            pieces.append(piece)
            if len(pieces) == 1:
                cancel.wait(timeout=60)

        cancels.append(cancel)
        return original(self, prompt, params, adapters, held, cancel, then)

    monkeypatch.setattr(Engine, "submit_stream", submit_stream)
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


# --- the surface as the official client and plain HTTP see it --------------------------------

def _client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def _rows(store: Store) -> tuple[int, int]:
    sessions = store.list_sessions("acme", limit=1000)
    return len(sessions), sum(s.message_count for s in sessions)


def test_models_retrieve_and_a_stable_created(live):
    base, key, _, model = live
    client = _client(base, key)
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model" and card.owned_by == "onthejob"
    listed = client.models.list().data[0]
    time.sleep(1.1)  # a `created` taken from the request's clock would move now
    assert client.models.retrieve(model).created == card.created == listed.created
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-17")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert err.value.body["type"] == "not_found_error" and model in err.value.body["message"]


def test_created_is_the_model_directory_time(tiny_dir, tmp_path):
    from pathlib import Path

    from fastapi.testclient import TestClient

    from onthejob.model import load_model

    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    store.create_tenant("acme")
    key = store.create_key("acme")
    lm = load_model(tiny_dir)
    with TestClient(create_app(lm, store)) as http:
        card = http.get(f"/v1/models/{lm.name}", headers={"Authorization": f"Bearer {key}"})
    assert card.json()["created"] == int((Path(tiny_dir) / "config.json").stat().st_mtime)
    store.close()


def test_ending_a_session_answers_its_true_message_count(live):
    base, key, store, model = live
    client = _client(base, key)
    history = []
    raw = None
    for turn in ("one", "two", "three", "four"):
        history.append({"role": "user", "content": turn})
        headers = {"X-Session-Id": raw.headers["x-session-id"]} if raw else {}
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=history, max_tokens=2, temperature=0, extra_headers=headers)
        history.append({"role": "assistant",
                        "content": raw.parse().choices[0].message.content})
    sid = raw.headers["x-session-id"]
    ended = httpx.post(f"{base}/v1/sessions/{sid}/end", headers={"Authorization": f"Bearer {key}"})
    assert ended.status_code == 200 and ended.json()["status"] == "ended"
    assert ended.json()["message_count"] == len(store.messages("acme", sid)) == 8


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def test_tools_are_accepted_stored_and_said_to_be_unusable_by_this_model(live):
    from onthejob.model import load_tokenizer
    from onthejob.model.chat import supports_tools

    base, key, store, model = live
    client = _client(base, key)
    assert not supports_tools(load_tokenizer())  # SmolLM2's template has no tool format
    raw = client.chat.completions.with_raw_response.create(
        model=model, max_tokens=4, temperature=0, tools=[WEATHER], tool_choice="auto",
        messages=[{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": "call_1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"}])
    assert raw.headers["x-onthejob-tools"] == "not-rendered"
    reply = raw.parse()
    assert reply.choices[0].message.tool_calls is None
    assert "cannot call tools" in reply.model_extra["warnings"][0]
    stored = store.messages("acme", raw.headers["x-session-id"])
    assert [m.kind for m in stored] == ["message", "tool_call", "observation", "message"]
    assert stored[2].meta["tools"] == [WEATHER] and stored[2].meta["tool_choice"] == "auto"
    assert stored[2].meta["tools_rendered"] is False and stored[2].content == "-3 C, snow"
    # A call the server cannot make happen is refused, and nothing is stored.
    before = _rows(store)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, tools=[WEATHER], tool_choice=choice,
                                           messages=[{"role": "user", "content": "x"}])
        assert err.value.body["param"] == "tool_choice"
    assert _rows(store) == before
    # Streaming says it in the first chunk.
    chunks = list(client.chat.completions.create(
        model=model, stream=True, max_tokens=2, tools=[WEATHER],
        messages=[{"role": "user", "content": "x"}]))
    assert "cannot call tools" in chunks[0].model_extra["warnings"][0]


def test_tools_are_rendered_where_the_chat_template_has_a_format_for_them(tiny_lm, tmp_path):
    import copy

    from fastapi.testclient import TestClient

    from onthejob.model import LoadedModel, render_ids
    from onthejob.model.chat import supports_tools

    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}"
        "{{ t.function.name }}: {{ t.function.description }}; {% endfor %}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert supports_tools(tokenizer)
    chat = [{"role": "user", "content": "Weather in Oslo?"}]
    text = tokenizer.decode(render_ids(tokenizer, chat, tools=[WEATHER]))
    assert "get_weather: The weather in a city" in text
    lm = LoadedModel(tiny_lm.model, tokenizer, "tiny-tools", "")
    store = Store(f"sqlite:///{tmp_path / 't.db'}")
    store.create_tenant("acme")
    auth = {"Authorization": f"Bearer {store.create_key('acme')}"}
    body = {"model": lm.name, "messages": chat, "max_tokens": 2, "temperature": 0}
    with TestClient(create_app(lm, store)) as http:
        plain = http.post("/v1/chat/completions", json=body, headers=auth)
        tooled = http.post("/v1/chat/completions", json={**body, "tools": [WEATHER]}, headers=auth)
        off = http.post("/v1/chat/completions", json={**body, "tools": [WEATHER],
                                                       "tool_choice": "none"}, headers=auth)
    assert tooled.status_code == 200 and tooled.headers["x-onthejob-tools"] == "rendered"
    assert "not parsed into tool_calls" in tooled.json()["warnings"][0]
    with_tools = len(render_ids(tokenizer, chat, tools=[WEATHER]))
    assert tooled.json()["usage"]["prompt_tokens"] == with_tools
    assert with_tools > plain.json()["usage"]["prompt_tokens"] == len(render_ids(tokenizer, chat))
    assert off.headers["x-onthejob-tools"] == "not-rendered"
    assert off.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    stored = store.messages("acme", tooled.headers["x-session-id"])
    assert stored[0].meta["tools"] == [WEATHER] and stored[0].meta["tools_rendered"] is True
    store.close()


def _refused(base, key, store, body, param, words, status=400):
    before = _rows(store)
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {key}"})
    error = r.json()["error"]
    assert r.status_code == status, r.text
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert _rows(store) == before  # nothing stored
    return error


UNKNOWN_SESSION = "00000000-0000-4000-8000-000000000000"
USER = [{"role": "user", "content": "hi"}]
IMAGE = [{"role": "user", "content": [
    {"type": "text", "text": "what is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]


@pytest.mark.parametrize("extra,headers,param,words,status", [
    ({"stream_options": {"include_usage": True}}, {}, "stream_options",
     "only allowed when stream is true", 400),
    ({"messages": [{"role": "user", "content": None}]}, {}, "messages.0.content",
     "needs content", 400),
    ({"messages": IMAGE}, {}, "messages.0.content", "takes text only", 400),
    ({"temperature": 2.5}, {}, "temperature", "temperature must be", 400),
    ({"top_p": 0.0}, {}, "top_p", "top_p must be", 400),
    ({"max_completion_tokens": 0}, {}, "max_completion_tokens", "max_completion_tokens must", 400),
    ({"max_tokens": 0}, {}, "max_tokens", "max_tokens must be", 400),
    ({"metadata": {"session_id": UNKNOWN_SESSION}}, {}, "metadata.session_id", "no session", 404),
    ({}, {"X-Session-Id": UNKNOWN_SESSION}, "X-Session-Id", "no session", 404),
], ids=["stream_options", "null-content", "image", "temperature", "top_p",
        "max_completion_tokens", "max_tokens", "metadata-session", "header-session"])
def test_what_openai_refuses_is_refused_with_the_right_param(live, extra, headers, param, words,
                                                             status):
    base, key, store, model = live
    before = _rows(store)
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": model, "messages": USER, **extra},
                   headers={"Authorization": f"Bearer {key}", **headers}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert "more problems" not in error["message"]
    assert _rows(store) == before  # nothing stored


def test_context_length_message_names_only_what_was_sent(live):
    base, key, store, model = live
    long = [{"role": "user", "content": "word " * 1200}]
    error = _refused(base, key, store, {"model": model, "messages": long}, "messages",
                     "leaves no room for an answer")
    assert "max_tokens" not in error["message"] and error["code"] == "context_length_exceeded"
    error = _refused(base, key, store, {"model": model, "messages": long, "max_tokens": 10},
                     "messages", "max_tokens is 10")


def test_unknown_routes_point_to_a_route_that_exists(live):
    import re

    base, key, _, _ = live
    r = httpx.get(f"{base}/v1/nothing-here", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    pointed = re.search(r"GET (/\S+)", r.json()["error"]["message"]).group(1)
    # It serves the API's routes themselves (not a page that needs the internet to render).
    document = httpx.get(f"{base}{pointed}")
    assert document.status_code == 200 and "/v1/chat/completions" in document.json()["paths"]


def test_keys_look_as_the_readme_shows(tmp_path):
    import re
    from pathlib import Path

    from onthejob.store.keys import KEY_PREFIX

    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    store.create_tenant("acme")
    key = store.create_key("acme")
    store.close()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    shown = re.findall(r'api_key="([^"]+)"', readme)
    assert shown and all(s.startswith(KEY_PREFIX) for s in shown) and key.startswith(KEY_PREFIX)


# --- log-probs: OpenAI's logprobs / top_logprobs, and what the server keeps for learning -------

def _greedy(lm, text: str, max_tokens: int, k: int):
    from onthejob.model import SamplingParams, generate, render_ids

    ids = render_ids(lm.tokenizer, [{"role": "user", "content": text}])
    return generate(lm, [ids], SamplingParams(max_tokens=max_tokens, top_logprobs=k))[0]


def test_logprobs_are_the_models_own_with_its_most_likely_tokens(live, tiny_lm):
    from onthejob.store.logprobs import decode

    base, key, store, model = live
    client = _client(base, key)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        temperature=0, logprobs=True, top_logprobs=5)
    reply = raw.parse()
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].logprobs.refusal is None
    assert len(content) == reply.usage.completion_tokens == 8
    same = _greedy(tiny_lm, "hello", 8, 5)  # what generate() says for the same prompt
    for entry, token, logprob, top in zip(content, same.token_ids, same.logprobs,
                                          same.top_logprobs, strict=True):
        assert len(entry.top_logprobs) == 5
        # Greedy: the token is the first of its top list, with the same log-prob.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.logprob == pytest.approx(logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in top],
                                                                         abs=1e-5)
        assert bytes(entry.bytes) == tiny_lm.tokenizer.decode([token]).encode() or \
            entry.token.startswith("bytes:")
    assert b"".join(bytes(e.bytes) for e in content).decode() == reply.choices[0].message.content
    # Without logprobs the body says null; top_logprobs 0 gives the tokens alone.
    plain = client.chat.completions.create(model=model, max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": "hello"}])
    assert plain.choices[0].logprobs is None
    bare = client.chat.completions.create(model=model, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=0,
                                          messages=[{"role": "user", "content": "hello"}])
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[], [], []]
    # The stored answer keeps its token ids and the top 32 (the server's default), whatever
    # the client asked for.
    sid = raw.headers["x-session-id"]
    answer = store.messages("acme", sid)[-1]
    kept = store.kept_logprobs("acme", sid)
    assert list(kept) == [answer.id]
    values = decode(kept[answer.id])
    assert values.token_ids == same.token_ids and values.k == 32 and not values.ended
    assert answer.meta["logprobs_kept"] == {"k": 32, "tokens": 8, "ended": False,
                                            "bytes": 13 + 8 * (2 + 4 * 32)}
    assert [row[0] for row in values.top_ids] == same.token_ids
    for row_ids, row_values, entry in zip(values.top_ids, values.top_logprobs, content, strict=True):
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row_values[:5], rel=1e-3,
                                                                        abs=1e-3)
        assert len(row_ids) == 32


def test_streamed_logprobs_come_with_their_text_and_none_is_lost(live):
    base, key, _, model = live
    client = _client(base, key)
    asked = dict(model=model, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
                 messages=[{"role": "user", "content": "tell me a story"}])
    whole = client.chat.completions.create(**asked).choices[0]
    entries, chunks = [], client.chat.completions.create(
        **asked, stream=True, stream_options={"include_usage": True})
    usage, last = None, None
    for chunk in chunks:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            # A chunk of text carries the tokens that made it (at least the one that ended it).
            assert choice.logprobs is not None and choice.logprobs.content
        if choice.logprobs is not None:
            entries += choice.logprobs.content
        last = choice
    assert last.finish_reason == whole.finish_reason
    assert usage.completion_tokens == len(entries) == len(whole.logprobs.content)
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in entries] == \
        [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in whole.logprobs.content]


def test_bad_top_logprobs_are_400s(live):
    base, key, store, model = live
    client = _client(base, key)
    before = _rows(store)
    for extra, says in (({"top_logprobs": 3}, "needs logprobs"),
                        ({"logprobs": True, "top_logprobs": 21}, "from 0 to 20"),
                        ({"logprobs": True, "top_logprobs": -1}, "from 0 to 20"),
                        ({"logprobs": False, "top_logprobs": 2}, "needs logprobs")):
        with pytest.raises(openai.BadRequestError, match=says) as err:
            client.chat.completions.create(model=model, max_tokens=2,
                                           messages=[{"role": "user", "content": "x"}], **extra)
        assert err.value.body["param"] == "top_logprobs"
    assert _rows(store) == before  # refused before anything was stored


class _PlainText:
    """An engine that streams plain text pieces (no token information with them)."""

    name = "plain"

    def __init__(self, lm):
        from onthejob.model.engine import TorchEngine

        self.inner = TorchEngine(lm)

    def generate(self, prompts, params, adapters=()):
        return self.inner.generate(prompts, params, adapters)

    def stream(self, prompt, params, adapters=()):
        for item in self.inner.stream(prompt, params, adapters):
            yield str(item) if isinstance(item, str) else item


def test_keep_top_k_zero_keeps_nothing_and_plain_text_engines_lose_no_logprobs(tiny_lm, tmp_path):
    import json

    from fastapi.testclient import TestClient

    from onthejob.serve.engine import Engine

    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    store.create_tenant("acme")
    key = store.create_key("acme")
    engine = Engine(tiny_lm, backend=_PlainText(tiny_lm))
    body = {"model": tiny_lm.name, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with TestClient(create_app(tiny_lm, store, engine=engine, keep_top_k=0)) as http:
            r = http.post("/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {key}"})
            sid = r.headers["x-session-id"]
    finally:
        engine.close()
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    choices = [e["choices"][0] for e in events if e["choices"]]
    texts = [c for c in choices if c["delta"].get("content")]
    assert texts and all(c["logprobs"] == {"content": [], "refusal": None} for c in texts)
    # The last chunk carries every token's log-prob, with its two alternatives.
    assert choices[-1]["finish_reason"] == "length"
    assert len(choices[-1]["logprobs"]["content"]) == 6
    assert all(len(e["top_logprobs"]) == 2 for e in choices[-1]["logprobs"]["content"])
    answer = store.messages("acme", sid)[-1]
    assert "logprobs_kept" not in answer.meta and store.kept_logprobs("acme", sid) == {}
    store.close()
