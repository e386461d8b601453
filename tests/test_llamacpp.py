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

    e = LlamaCppEngine(tokenizer=tokenizer, n_threads=1, max_batch=4, seq_context=512)
    yield e
    e.close()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two tenants' adapters (different random B, large enough to change greedy text) and
    one whose B is zero (changes nothing)."""
    root = tmp_path_factory.mktemp("adapters")
    return {"acme": str(fake_adapter(root / "acme", rank=4, alpha=8, seed=1, b_std=0.05)),
            "globex": str(fake_adapter(root / "globex", rank=4, alpha=8, seed=2, b_std=0.05)),
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
    long = engine.generate(prompts[2:], SamplingParams(max_tokens=200))[0]
    assert long.finish_reason == "stop" and 0 < len(long.token_ids) < 200  # end of turn
    assert "Red" in long.text
    assert len(long.logprobs) == len(long.token_ids) and all(lp <= 0 for lp in long.logprobs)
    assert long.text == tokenizer.decode(long.token_ids, skip_special_tokens=True)
    short = engine.generate(prompts[2:], SamplingParams(max_tokens=3))[0]
    assert short.finish_reason == "length" and short.token_ids == long.token_ids[:3]
    word = long.text.split()[2]
    cut = engine.generate(prompts[2:], SamplingParams(max_tokens=200, stop=[word]))[0]
    assert cut.finish_reason == "stop" and word not in cut.text
    assert long.text.startswith(cut.text)
    top = engine.generate(prompts[:1], SamplingParams(max_tokens=4, top_logprobs=5))[0]
    for token, lp, alts in zip(top.token_ids, top.logprobs, top.top_logprobs, strict=True):
        assert len(alts) == 5 and alts[0][0] == token and alts[0][1] == pytest.approx(lp)
        assert [a[1] for a in alts] == sorted((a[1] for a in alts), reverse=True)
    with pytest.raises(ContextLengthError, match="engine's context is 512 tokens"):
        engine.generate([prompts[0]], SamplingParams(max_tokens=500))


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
    """Prompts decoded together (one llama_decode a step for all) give what each gives alone:
    exactly on the base model. With an adapter llama.cpp's single-token steps and multi-token
    steps may round the LoRA product differently (see docs/llamacpp.md), so there the texts
    must agree on their first tokens, not to the last bit."""
    params = SamplingParams(max_tokens=24)
    for adapter, exact in (([], True), ([adapters["acme"]], False)):
        alone = [engine.generate([p], params, adapter)[0].token_ids for p in prompts]
        calls = engine.decode_calls
        together = [c.token_ids for c in engine.generate(prompts, params, adapter)]
        assert engine.decode_calls - calls <= params.max_tokens  # one call a step, shared
        # More prompts than sequences (4): decoded 4 at a time, in order.
        many = [c.token_ids for c in engine.generate(prompts * 2, params, adapter)]
        for got in (together, many[:3], many[3:]):
            if exact:
                assert got == alone
            else:
                assert [g[:8] for g in got] == [a[:8] for a in alone]


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
    # A stream given up after one piece gives its sequence back at once.
    s = engine.stream(prompts[0], GREEDY, [adapters["acme"]])
    next(s)
    assert len(engine._free_seqs) == engine.max_batch - 1
    s.close()
    assert len(engine._free_seqs) == engine.max_batch


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
    assert len(engine._free_seqs) == engine.max_batch


def test_agreement_report_finds_where_the_engines_part():
    from onthejob.bench.engines import compare_runs
    from onthejob.model import Completion

    same = Completion([1], [5, 6], [-0.1, -0.2], "ab", "length", [[(5, -0.1)], [(6, -0.2)]])
    torch_row = Completion([1], [5, 6, 7], [-0.1, -0.7, -0.3], "abc", "length",
                           [[(5, -0.1)], [(6, -0.7), (9, -0.8)], [(7, -0.3)]])
    llama_row = Completion([1], [5, 9, 2], [-0.12, -0.75, -1.0], "axy", "length")
    r = compare_runs([same, torch_row], [same, llama_row])
    assert r["identical"] == 1 and [x["common_prefix"] for x in r["rows"]] == [2, 1]
    assert r["rows"][1]["margin_at_parting"] == pytest.approx(0.1)
    assert r["rows"][1]["logprob_abs_diff"] == pytest.approx(0.02)


@slow
@needs_llama
def test_llamacpp_with_an_exported_adapter_computes_what_torch_does(tmp_path, monkeypatch):
    """A float32 GGUF of a tiny random Llama: llama.cpp with onthejob's GGUF export of a LoRA
    (on q, k, v, o and the MLP) gives torch's log-probs with that LoRA, to f16-KV precision;
    the same export without the q/k row permutation does not."""
    import shutil

    from lora_fixtures import write_gguf

    from onthejob.model import generate, tiny_model
    from onthejob.model.adapters import LoraSpec, random_lora, save, use_adapter
    from onthejob.model.gguf_lora import shipped_gguf
    from onthejob.model.llamacpp import LlamaCppEngine

    lm = tiny_model(seed=3)
    random_lora(lm, "t", LoraSpec(rank=4, alpha=8), seed=5, scale=0.5)
    adapter = str(tmp_path / "adapter")
    save(lm.model, "t", adapter)
    lm.model = lm.model.unload()
    model = write_gguf(lm, tmp_path / "tiny.gguf", shipped_gguf())
    engine = LlamaCppEngine(model_path=model, tokenizer=lm.tokenizer, n_threads=1, max_batch=1,
                            seq_context=256)
    prompt = render_ids(lm.tokenizer, [{"role": "user", "content": "Tell me about rivers."}])
    params = SamplingParams(max_tokens=6, ignore_eos=True, top_logprobs=5)

    def top(c):  # the first step's five most likely tokens and their log-probs
        return dict(c.top_logprobs[0])

    try:
        for adapters in ([], [adapter]):
            use_adapter(lm, adapters or None)
            want = generate(lm, [prompt], params, fast=False)[0]
            got = engine.generate([prompt], params, adapters)[0]
            assert got.token_ids == want.token_ids, adapters
            assert got.logprobs == pytest.approx(want.logprobs, abs=2e-3)
            assert top(got).keys() == top(want).keys()
            for t, lp in top(want).items():
                assert top(got)[t] == pytest.approx(lp, abs=2e-3)
        base = generate(lm, [prompt], params, fast=False)  # still with the adapter
        use_adapter(lm, None)
        effect = max(abs(a - b) for a, b in zip(
            base[0].logprobs, generate(lm, [prompt], params, fast=False)[0].logprobs,
            strict=True))
        assert effect > 0.05  # the adapter matters, so agreeing with it means something
        # Exported without the permutation, llama.cpp applies q/k deltas to the wrong rows.
        monkeypatch.setattr("onthejob.model.gguf_lora.permute_rows", lambda b, n: b)
        unpermuted = shutil.copytree(adapter, tmp_path / "unpermuted")
        wrong = engine.generate([prompt], params, [str(unpermuted)])[0]
        use_adapter(lm, [adapter])
        right = generate(lm, [prompt], params, fast=False)[0]
        assert max(abs(top(wrong).get(t, -99) - lp) for t, lp in top(right).items()) > 0.02
    finally:
        engine.close()


@slow
@needs_llama
def test_bench_generate_measures_a_llamacpp_row(tokenizer, adapters, prompts):
    """`onthejob bench generate --engine torch,llamacpp`'s llama.cpp row (without the torch
    model: the default model's name and tokenizer are all the engine takes from it)."""
    from types import SimpleNamespace

    from onthejob.bench.generate import _runner, agreement, measure
    from onthejob.model import DEFAULT_MODEL_NAME

    lm = SimpleNamespace(name=DEFAULT_MODEL_NAME, tokenizer=tokenizer)
    label, gen, close = _runner("llamacpp", "float32", lm, adapters["acme"], batch=2, context=200)
    try:
        r = measure(gen, prompts * 3, batches=[1, 2], tokens=4, repeats=1)
    finally:
        close()
    assert label == "llamacpp Q4_1"
    assert set(r["tok_s"]) == {"1", "2"} and all(v > 0 for v in r["tok_s"].values())
    assert r["first_token_s"] > 0 and len(r["greedy_ids"]) == 8
    torch_run = {"greedy_ids": [ids[:2] + [0, 0] for ids in r["greedy_ids"]]}
    a = agreement({"torch float32": torch_run, label: r})[label]
    assert a["identical"] == "0/8" and a["common_prefix_tokens"] == [2] * 8
