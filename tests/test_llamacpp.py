"""The llama.cpp engine (model/llamacpp.py) on the shipped Q4_1 GGUF (~100 MB, one thread):
adapters exported to GGUF and applied per request, never one tenant's on another's tokens."""

from __future__ import annotations

import os
import threading

import pytest
from lora_fixtures import fake_adapter

from onthejob.model import ContextLengthError, SamplingParams, load_tokenizer, render_ids
from onthejob.model.adapters import AdapterError
from onthejob.model.engine import ENGINES, OPTIONAL, make_engine
from onthejob.model.llamacpp import unavailable

needs_llama = pytest.mark.skipif(unavailable() is not None,
                                 reason=f"the llama.cpp engine cannot run: {unavailable()}")
slow = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
QUESTIONS = ("What is the capital of France?", "Write a haiku about rain.",
             "Name three primary colors.")


def test_missing_llama_cpp_is_a_clear_error(monkeypatch, tiny_lm):
    monkeypatch.delitem(ENGINES, "llamacpp", raising=False)
    with pytest.raises(ValueError, match="pip install llama-cpp-python"):
        make_engine("llamacpp", tiny_lm)
    assert "llamacpp" in OPTIONAL


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    from onthejob.model.llamacpp import LlamaCppEngine

    e = LlamaCppEngine(tokenizer=tokenizer, n_threads=1, n_ctx=4096, max_batch=8)
    yield e
    e.close()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two tenants' adapters (different random B, large enough to change greedy text) and
    one whose B is zero (changes nothing)."""
    root = tmp_path_factory.mktemp("adapters")
    return {"acme": str(fake_adapter(root / "acme", rank=4, alpha=8, seed=1, b_std=0.3)),
            "globex": str(fake_adapter(root / "globex", rank=4, alpha=8, seed=2, b_std=0.3)),
            "zero": str(fake_adapter(root / "zero", rank=4, alpha=8, seed=3, b_std=0.0))}


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [render_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@slow
@needs_llama
def test_adapter_changes_greedy_output_and_zero_b_changes_nothing(engine, adapters, prompts):
    base = engine.generate(prompts[:1], GREEDY)[0]
    acme = engine.generate(prompts[:1], GREEDY, [adapters["acme"]])[0]
    assert engine.applied == [os.path.realpath(adapters["acme"])]
    zero = engine.generate(prompts[:1], GREEDY, [adapters["zero"]])[0]
    again = engine.generate(prompts[:1], GREEDY)[0]
    assert engine.applied == []  # a base request runs with no adapter left on
    assert len(base.token_ids) == 24 and base.text
    assert acme.token_ids != base.token_ids
    assert zero.token_ids == base.token_ids and again.token_ids == base.token_ids
    assert zero.logprobs == pytest.approx(base.logprobs, abs=1e-4)
    # Stacked: acme + zero is acme.
    both = engine.generate(prompts[:1], GREEDY, [adapters["zero"], adapters["acme"]])[0]
    assert both.token_ids == acme.token_ids


@slow
@needs_llama
def test_completion_fields_stop_and_length(engine, prompts, tokenizer):
    long = engine.generate(prompts[:1], SamplingParams(max_tokens=200))[0]
    assert long.finish_reason == "stop" and 0 < len(long.token_ids) < 200  # end of turn
    assert "Paris" in long.text
    assert len(long.logprobs) == len(long.token_ids) and all(lp <= 0 for lp in long.logprobs)
    assert long.text == tokenizer.decode(long.token_ids, skip_special_tokens=True)
    short = engine.generate(prompts[:1], SamplingParams(max_tokens=3))[0]
    assert short.finish_reason == "length" and short.token_ids == long.token_ids[:3]
    word = long.text.split()[2]
    cut = engine.generate(prompts[:1], SamplingParams(max_tokens=200, stop=[word]))[0]
    assert cut.finish_reason == "stop" and word not in cut.text
    assert long.text.startswith(cut.text)
    top = engine.generate(prompts[:1], SamplingParams(max_tokens=4, top_logprobs=5))[0]
    for token, lp, alts in zip(top.token_ids, top.logprobs, top.top_logprobs, strict=True):
        assert len(alts) == 5 and alts[0][0] == token and alts[0][1] == pytest.approx(lp)
        assert [a[1] for a in alts] == sorted((a[1] for a in alts), reverse=True)
    with pytest.raises(ContextLengthError, match="context"):
        engine.generate([prompts[0]], SamplingParams(max_tokens=5000))


@slow
@needs_llama
def test_sampling_is_seeded(engine, prompts):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = engine.generate(prompts[1:2], params)[0]
    b = engine.generate(prompts[1:2], params)[0]
    other = [engine.generate(prompts[1:2], SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True))[0].token_ids
        for s in (8, 9)]
    assert a.token_ids == b.token_ids
    assert any(o != a.token_ids for o in other)


@slow
@needs_llama
def test_a_batch_equals_each_prompt_alone(engine, adapters, prompts):
    alone = [engine.generate([p], GREEDY, [adapters["acme"]])[0].token_ids for p in prompts]
    calls = engine.decode_calls
    together = engine.generate(prompts, GREEDY, [adapters["acme"]])
    assert engine.decode_calls - calls == GREEDY.max_tokens  # one prefill + 23 steps, shared
    same = sum(c.token_ids == a for c, a in zip(together, alone, strict=True))
    assert same == len(prompts), [c.text for c in together]


@slow
@needs_llama
def test_interleaved_streams_each_keep_their_own_adapter(engine, adapters, prompts):
    """Two streams advanced in turn on one context (the context's LoRA set is global):
    each stream's text is what its tenant gets alone."""
    want = {t: engine.generate(prompts[:1], GREEDY, [adapters[t]])[0].text
            for t in ("acme", "globex")}
    assert want["acme"] != want["globex"]
    streams = {t: engine.stream(prompts[0], GREEDY, [adapters[t]]) for t in want}
    got = {t: [] for t in want}
    done = set()
    while len(done) < 2:
        for t, s in streams.items():
            if t in done:
                continue
            item = next(s)
            if isinstance(item, str):
                got[t].append(item)
            else:
                done.add(t)
                assert item.text == want[t]
    assert {t: "".join(p) for t, p in got.items()} == want


@slow
@needs_llama
def test_two_tenants_streaming_at_once_through_the_server_engine(engine, adapters, prompts,
                                                                  tiny_lm):
    from onthejob.serve.engine import Engine

    want = {t: engine.generate(prompts[:1], GREEDY, [adapters[t]])[0].text
            for t in ("acme", "globex")}
    server = Engine(tiny_lm, backend=engine)
    try:
        pieces = {t: [] for t in want}
        futures = {}
        start = threading.Barrier(2)

        def client(t):
            start.wait()
            futures[t] = server.submit_stream(prompts[0], GREEDY, [adapters[t]],
                                              on_piece=pieces[t].append,
                                              cancel=threading.Event())

        threads = [threading.Thread(target=client, args=(t,)) for t in want]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for t in want:
            completion = futures[t].result(timeout=120)
            assert completion.text == want[t]
            assert "".join(pieces[t]) == want[t]
    finally:
        server.close()


@slow
@needs_llama
def test_exports_are_cached_and_bad_adapters_refused(engine, adapters, prompts, tmp_path):
    before = engine.exports
    engine.generate(prompts[:1], SamplingParams(max_tokens=2), [adapters["acme"]])
    engine.generate(prompts[:1], SamplingParams(max_tokens=2), [adapters["acme"]])
    assert engine.exports == before  # exported and loaded by earlier tests, once
    bad = fake_adapter(tmp_path / "bad", layers=1)
    with open(bad / "adapter_model.safetensors", "r+b") as f:
        f.seek(120)
        f.write(b"\x00" * 8)
    with pytest.raises(AdapterError, match="corrupt"):
        engine.generate(prompts[:1], GREEDY, [str(bad)])
    with pytest.raises(AdapterError, match="missing"):
        engine.generate(prompts[:1], GREEDY, [str(tmp_path / "nowhere")])
    # The engine is still whole: its sequences were given back.
    assert len(engine.generate(prompts, SamplingParams(max_tokens=2))) == 3
    assert len(engine._free_seqs) == engine.max_batch and engine._held == 0
