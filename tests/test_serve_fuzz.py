"""Random request bodies never produce a 5xx, and refused ones store nothing."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onthejob.serve.app import create_app
from onthejob.serve.http import Limits
from onthejob.store import Store

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool",
                                                          "wizard", 3]),
                                 "content": st.one_of(st.text(max_size=30), values)},
                                optional={"name": values, "tool_calls": values, "extra": values})
body = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny-random-0", "default", "gpt-4", "", 7])},
    optional={"messages": st.one_of(st.lists(message, max_size=3), values),
              "max_tokens": st.one_of(st.integers(-5, 5000), values),
              "temperature": st.one_of(st.floats(-3, 3), values),
              "top_p": st.one_of(st.floats(-1, 2), values), "stop": values, "seed": values,
              "stream": st.booleans(), "n": values, "metadata": values, "unknown": values})


@pytest.fixture(scope="module")
def fuzz_server(tiny_lm, tmp_path_factory):
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'f.db'}")
    store.create_tenant("acme")
    key = store.create_key("acme")
    app = create_app(tiny_lm, store, limits=Limits(default_max_tokens=3, max_tokens=4))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, key
    store.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(payload=body, raw=st.booleans())
def test_no_request_body_breaks_the_server(fuzz_server, payload, raw):
    client, key = fuzz_server
    data = json.dumps(payload).encode() if not raw else json.dumps(payload).encode()[:-1]
    r = client.post("/v1/chat/completions", content=data,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["message"] and error["code"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(review=values, path_id=st.text(max_size=40))
def test_no_review_body_or_session_id_breaks_the_server(fuzz_server, review, path_id):
    client, key = fuzz_server
    r = client.post(f"/v1/sessions/{quote(path_id, safe='')}/review",
                    content=json.dumps(review).encode(),
                    headers={"Authorization": f"Bearer {key}"})
    assert r.status_code < 500, r.text
