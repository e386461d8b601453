"""The generation engine (batching, cancellation) and per-tenant adapters in the server."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from onthejob.model import SamplingParams, generate, render_ids, tiny_model
from onthejob.model import adapters as model_adapters
from onthejob.serve.app import create_app
from onthejob.serve.engine import Engine, Overloaded
from onthejob.store import Store


def _prompt(lm, text):
    return render_ids(lm.tokenizer, [{"role": "user", "content": text}])


def test_without_continuous_batching_same_params_requests_share_one_generate_call(tiny_lm):
    engine = Engine(tiny_lm, max_batch=8, continuous=False)
    params = SamplingParams(max_tokens=5)
    prompts = [_prompt(tiny_lm, t) for t in ("a", "b c", "d e f", "g")]
    try:
        with engine.lock:  # hold the model: the first job waits, the rest queue behind it
            futures = [engine.submit(prompts[0], params)]
            while engine.queued:  # until the worker has taken the first job
                time.sleep(0.01)
            futures += [engine.submit(p, params) for p in prompts[1:]]
            other = engine.submit(prompts[0], SamplingParams(max_tokens=3))
        results = [f.result(timeout=60) for f in futures]
        other.result(timeout=60)
        # first job alone (it was taken before the others arrived), then the 3 others together,
        # then the job with different parameters.
        assert engine.batches_run == 3
        expected = generate(tiny_lm, prompts, params)
        assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    finally:
        engine.close()


def test_continuous_batching_shares_steps_and_answers_as_alone(tiny_lm):
    """Requests with different lengths, parameters and arrival times share decode steps, and
    each gets what it would get alone."""
    engine = Engine(tiny_lm, max_batch=8)
    assert engine.continuous
    prompts = [_prompt(tiny_lm, t) for t in ("a", "a much longer question than the others", "d e")]
    plans = [SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=4),
             SamplingParams(max_tokens=9, temperature=0.8, seed=5, top_logprobs=3)]
    try:
        with engine.lock:  # all three are seated before the first step
            futures = [engine.submit(p, params) for p, params in zip(prompts, plans, strict=True)]
            while engine.queued:
                time.sleep(0.01)
        results = [f.result(timeout=60) for f in futures]
        assert engine.widest == 3  # the three shared steps
        assert engine.batches_run == 12  # the longest answer's steps, not the sum of all three
        # a stream that arrives while a long answer is decoding joins it and ends first
        pieces: list[str] = []
        long = engine.submit(prompts[0], SamplingParams(max_tokens=60, ignore_eos=True))
        while engine.batches_run < 14:
            time.sleep(0.005)
        short = engine.submit_stream(prompts[2], SamplingParams(max_tokens=3, ignore_eos=True),
                                     (), pieces.append, threading.Event())
        done = short.result(timeout=60)
        assert not long.done()  # it joined the running batch, it did not wait for it
        final = long.result(timeout=60)
    finally:
        engine.close()
    for prompt, params, got in zip(prompts, plans, results, strict=True):
        alone = generate(tiny_lm, [prompt], params)[0]
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.finish_reason == alone.finish_reason
    assert results[2].top_logprobs is not None and len(results[2].top_logprobs[0]) == 3
    assert "".join(pieces) == done.text
    assert done.token_ids == generate(tiny_lm, [prompts[2]], SamplingParams(
        max_tokens=3, ignore_eos=True))[0].token_ids
    assert final.token_ids == generate(tiny_lm, [prompts[0]], SamplingParams(
        max_tokens=60, ignore_eos=True))[0].token_ids


def test_engine_runs_then_on_worker_and_refuses_when_full(tiny_lm):
    engine = Engine(tiny_lm, max_queue=2)
    prompt = _prompt(tiny_lm, "x")
    try:
        with engine.lock:
            first = engine.submit(prompt, SamplingParams(max_tokens=2), then=lambda c: ("stored", c.text))
            while engine.queued:
                time.sleep(0.01)
            engine.submit(prompt, SamplingParams(max_tokens=2))
            engine.submit(prompt, SamplingParams(max_tokens=2))
            with pytest.raises(Overloaded):
                engine.submit(prompt, SamplingParams(max_tokens=2))
        assert first.result(timeout=60)[0] == "stored"
        with pytest.raises(ValueError):
            engine.submit(prompt, SamplingParams(max_tokens=0))
    finally:
        engine.close()


def test_stream_cancel_stops_generation(tiny_lm):
    engine = Engine(tiny_lm)
    cancel = threading.Event()
    pieces = []

    def on_piece(piece):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()

    try:
        done = engine.submit_stream(_prompt(tiny_lm, "go"), SamplingParams(max_tokens=500),
                                    (), on_piece, cancel).result(timeout=60)
    finally:
        engine.close()
    assert done.finish_reason == "cancelled" and done.text == "".join(pieces)
    assert len(pieces) == 3


def _write_adapter(target, seed):
    """A LoRA with random (far from zero) weights, written from a separate copy of the model."""
    lm = tiny_model(seed=0)
    model_adapters.attach(lm, "fresh", model_adapters.LoraSpec(rank=4, alpha=64))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    digest = model_adapters.save(lm.model, "fresh", target)
    return digest


def test_tenant_adapter_applies_to_its_requests_only(tmp_path):
    lm = tiny_model(seed=0)
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    store.create_tenant("acme")
    store.create_tenant("globex")
    keys = {t: store.create_key(t) for t in ("acme", "globex")}
    body = {"model": lm.name, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "what do you know?"}]}
    with TestClient(create_app(lm, store)) as client:
        def answer(tenant):
            r = client.post("/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {keys[tenant]}"})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        base = answer("acme")
        assert answer("globex") == base
        v1_path = tmp_path / "adapters" / "acme-v1"
        v1 = store.add_adapter("tenant", "acme", method="test", path=str(v1_path),
                               checksum=_write_adapter(v1_path, seed=1))
        store.activate_adapter(v1.id)
        tuned = answer("acme")  # picked up without a restart
        assert tuned != base
        assert answer("globex") == base  # B never gets A's adapter
        assert answer("acme") == tuned
        # A newer version whose file is corrupted: refused, its parent is served instead.
        v2_path = tmp_path / "adapters" / "acme-v2"
        v2 = store.add_adapter("tenant", "acme", method="test", path=str(v2_path),
                               checksum=_write_adapter(v2_path, seed=2), parent_id=v1.id)
        store.activate_adapter(v2.id)
        assert answer("acme") != tuned
        with open(v2_path / "adapter_model.safetensors", "r+b") as handle:
            handle.seek(200)
            handle.write(b"\x00\x01\x02\x03")
        assert answer("acme") == tuned
    store.close()


def test_full_queue_is_503_and_stores_nothing(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'q.db'}")
    store.create_tenant("acme")
    key = store.create_key("acme")
    engine = Engine(tiny_lm, max_queue=1)
    body = {"model": tiny_lm.name, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}
    try:
        with TestClient(create_app(tiny_lm, store, engine=engine)) as client, engine.lock:
            engine.submit(_prompt(tiny_lm, "a"), SamplingParams(max_tokens=1))
            while engine.queued:
                time.sleep(0.01)
            engine.submit(_prompt(tiny_lm, "b"), SamplingParams(max_tokens=1))  # queue full
            r = client.post("/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
            assert store.list_sessions("acme") == []
    finally:
        engine.close()
        store.close()
