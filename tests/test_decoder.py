"""The fast decoder (model/decoder.py) against the transformers forward it replaces: same greedy
tokens, same log-probabilities, with and without adapters, as weights change under training."""

import importlib

import pytest
import torch

from onthejob.model import SamplingParams, generate, render_ids, tiny_model
from onthejob.model.adapters import LoraSpec, activate, attach

QUESTIONS = ["hi", "Explain why the sky is blue, in some detail please.", "2+2?", "Name a colour."]
GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)


@pytest.fixture
def lm():
    """A tiny random model whose greedy answers depend on the prompt (at the default init
    every prompt gives the same repeated token, which would make these comparisons empty)."""
    lm = tiny_model(seed=1, layers=3, hidden=64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if p.dim() == 2:
                scale = 1.0 if "embed" in name else 2.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale / p.shape[1] ** 0.5)
    return lm


def test_the_test_model_answers_differ(lm):
    outs = generate(lm, _prompts(lm), GREEDY)
    assert len({tuple(c.token_ids) for c in outs}) == len(outs)
    assert all(len(set(c.token_ids)) > 5 for c in outs)


def _prompts(lm):
    return [render_ids(lm.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def _randomize_lora(lm, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def assert_same(fast, ref):
    for f, r in zip(fast, ref, strict=True):
        assert f.token_ids == r.token_ids
        assert f.logprobs == pytest.approx(r.logprobs, rel=1e-5, abs=2e-5)


@pytest.mark.parametrize("packed", [True, False])
def test_greedy_is_token_identical_to_transformers(lm, packed, monkeypatch):
    from onthejob.model import decoder

    monkeypatch.setitem(decoder._PACKING, torch.float32, packed)
    prompts = _prompts(lm)
    fast = generate(lm, prompts, GREEDY, fast=True)
    assert_same(fast, generate(lm, prompts, GREEDY, fast=False))
    # Left padding changes nothing: each prompt alone gives what it gave in the batch.
    for prompt, out in zip(prompts, fast, strict=True):
        assert generate(lm, [prompt], GREEDY, fast=True)[0].token_ids == out.token_ids
    hf = lm.model.generate(torch.tensor([prompts[1]]), max_new_tokens=20, min_new_tokens=20,
                           do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert hf[0, len(prompts[1]):].tolist() == fast[1].token_ids
    assert (lm.decoder_cache.layers[0].qkv.packed is not None) == packed


def test_sampling_matches_transformers_for_a_seed(lm):
    prompts = _prompts(lm)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11)
    assert_same(generate(lm, prompts, params, fast=True), generate(lm, prompts, params, fast=False))


def test_stacked_adapters_are_merged_exactly(lm):
    attach(lm, "shared", spec=LoraSpec(rank=4, alpha=8), trainable=False)
    attach(lm, "tenant", spec=LoraSpec(rank=8, alpha=8), trainable=False)
    _randomize_lora(lm, 0.3, seed=0)
    prompts = _prompts(lm)
    activate(lm, ["shared", "tenant"])
    both = generate(lm, prompts, GREEDY, fast=True)
    assert_same(both, generate(lm, prompts, GREEDY, fast=False))
    activate(lm, ["tenant"])
    assert_same(generate(lm, prompts, GREEDY, fast=True), generate(lm, prompts, GREEDY, fast=False))
    activate(lm, None)
    base = generate(lm, prompts, GREEDY, fast=True)
    assert_same(base, generate(lm, prompts, GREEDY, fast=False))
    assert [c.token_ids for c in base] != [c.token_ids for c in both]  # the adapters do something


def test_a_training_student_samples_with_its_current_weights(lm):
    """The trainer's pattern: a trainable adapter, sampled, then changed in place by the
    optimizer, again and again. After its first change it is applied unmerged (live), so
    later steps sample from its current values without rebuilding the merged weights."""
    attach(lm, "student", spec=LoraSpec(rank=4, alpha=8), trainable=True)
    _randomize_lora(lm, 0.3, seed=1)
    activate(lm, ["student"], trainable="student")
    prompts = _prompts(lm)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    seen, decoders = [], []
    for step in range(3):
        out = generate(lm, prompts, GREEDY, fast=True)
        assert_same(out, generate(lm, prompts, GREEDY, fast=False))
        seen.append([c.token_ids for c in out])
        decoders.append(lm.decoder_cache)
        gen = torch.Generator().manual_seed(step)
        loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert seen[0] != seen[1] != seen[2]
    assert decoders[1] is not decoders[0]  # the first change: rebuilt, the student now live
    assert decoders[2] is decoders[1]  # later changes: read at every step, no rebuild
    assert decoders[2].layers[0].qkv.live


def test_autocast_around_the_call_is_not_inherited(lm):
    """Training runs rule steps under bf16 autocast; sampling inside them stays float32."""
    prompts = _prompts(lm)
    plain = generate(lm, prompts, GREEDY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = generate(lm, prompts, GREEDY)
    assert_same(inside, plain)


def test_bfloat16_decoding_is_opt_in_and_close(lm):
    prompts = _prompts(lm)
    exact = generate(lm, prompts, GREEDY)
    lm.decode_dtype = torch.bfloat16
    rounded = generate(lm, prompts, SamplingParams(max_tokens=1))
    assert lm.decoder_cache.layers[0].qkv.dtype == torch.bfloat16
    first = [c.logprobs[0] for c in exact]
    assert [c.logprobs[0] for c in rounded] == pytest.approx(first, abs=0.05)
    assert [c.logprobs[0] for c in rounded] != pytest.approx(first, abs=1e-6)


def test_int8_quantization_rounds_each_weight_to_its_channel_scale():
    from onthejob.model.decoder import dequantize_int8, quantize_int8

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=gen) * torch.linspace(0.01, 3.0, 48)[:, None]
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (48,)
    assert int(q.abs().max()) <= 127 and (q.abs().amax(dim=1) >= 126).all()  # range used
    back = dequantize_int8(q, scales)
    # within half a step of its own channel's scale (the scale itself is rounded to bf16)
    assert ((back - w).abs() <= scales.float()[:, None] * 0.5 + 1e-6).all()


@pytest.mark.skipif(not importlib.import_module("onthejob.model.decoder").int8_works(),
                    reason="this torch has no weight-only int8 kernel")
def test_int8_decoding_is_close_and_both_kernels_compute_the_same_weights(lm, monkeypatch):
    from onthejob.model import decoder

    prompts = _prompts(lm)
    exact = generate(lm, prompts, SamplingParams(max_tokens=1))
    lm.decode_dtype = decoder.INT8
    rounded = generate(lm, prompts, SamplingParams(max_tokens=1))
    qkv = lm.decoder_cache.layers[0].qkv
    rows, wide = decoder.int8_plan(lm.device)
    assert qkv.q8 is not None and qkv.q8[0].dtype == torch.int8 and qkv.dtype == wide
    assert qkv.int8_rows == rows
    first = [c.logprobs[0] for c in exact]
    assert [c.logprobs[0] for c in rounded] == pytest.approx(first, abs=0.1)
    assert [c.logprobs[0] for c in rounded] != pytest.approx(first, abs=1e-6)
    # one row at a time (the int8 kernel) and all rows at once (the wide copy of the same
    # quantized weights): the same products, up to bf16 rounding
    x = torch.randn(rows + 3, qkv.q8[0].shape[1])
    many = qkv(x).float()
    alone = torch.cat([qkv(row[None]) for row in x]).float()
    assert torch.allclose(many, alone, atol=0.05, rtol=0.02)


def test_int8_plan_follows_native_bf16(monkeypatch):
    from onthejob.model import decoder

    cpu = torch.device("cpu")
    monkeypatch.setattr(decoder, "native_bf16", lambda device: True)
    assert decoder.int8_plan(cpu) == (decoder.INT8_ROWS_NATIVE_BF16, torch.bfloat16)
    monkeypatch.setattr(decoder, "native_bf16", lambda device: False)
    assert decoder.int8_plan(cpu) == (decoder.INT8_ROWS_EMULATED_BF16, torch.float32)


@pytest.mark.skipif(not importlib.import_module("onthejob.model.decoder").int8_works(),
                    reason="this torch has no weight-only int8 kernel")
def test_int8_decoding_follows_an_adapter_in_training(lm):
    """A live adapter is added unmerged to the int8 products: moving it moves the answers."""
    from onthejob.model import decoder

    attach(lm, "student", LoraSpec(rank=4), trainable=True)
    lm.decode_dtype = decoder.INT8
    prompts = _prompts(lm)
    before = generate(lm, prompts, SamplingParams(max_tokens=1))
    _randomize_lora(lm, 0.5, seed=3)
    after = generate(lm, prompts, SamplingParams(max_tokens=1))
    assert lm.decoder_cache.layers[0].qkv.live
    assert [c.logprobs[0] for c in after] != pytest.approx([c.logprobs[0] for c in before],
                                                          abs=1e-3)


def test_unsupported_adapters_fall_back_to_transformers(lm):
    from peft import LoraConfig

    attach(lm, "dora", trainable=False)
    lm.model.add_adapter("dora2", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    activate(lm, ["dora2"])
    prompts = _prompts(lm)
    with pytest.raises(ValueError, match="not vanilla LoRA"):
        generate(lm, prompts, GREEDY, fast=True)
    assert_same(generate(lm, prompts, GREEDY), generate(lm, prompts, GREEDY, fast=False))


@pytest.mark.parametrize("fast", [True, False])
def test_repeated_prompts_are_encoded_once_with_the_same_results(lm, fast, monkeypatch):
    """A group of samples of one prompt: one prefill, the same tokens as encoding each row."""
    gen_module = importlib.import_module("onthejob.model.generate")

    prompts = _prompts(lm)
    group = [prompts[1], prompts[0], prompts[1], prompts[1]]
    prefilled = []
    steps = gen_module._steps

    def spy(*args, **kwargs):
        made = steps(*args, **kwargs)
        prefill = made.prefill
        made.prefill = lambda ids, positions: (prefilled.append(ids.shape[0]),
                                               prefill(ids, positions))[1]
        return made

    monkeypatch.setattr(gen_module, "_steps", spy)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    grouped = generate(lm, group, params, fast=fast)
    assert prefilled == [2]
    # Each row as its own prompt (made distinct objects, still equal): same tokens as one by one.
    alone = [generate(lm, [p], SamplingParams(max_tokens=12, ignore_eos=True), fast=fast)[0]
             for p in group]
    greedy = generate(lm, group, SamplingParams(max_tokens=12, ignore_eos=True), fast=fast)
    assert [c.token_ids for c in greedy] == [c.token_ids for c in alone]
    # Rows that share a prompt are still sampled independently.
    assert len({tuple(grouped[i].token_ids) for i in (0, 2, 3)}) == 3


def test_a_prefix_every_prompt_shares_is_encoded_once_with_the_same_results(lm, monkeypatch):
    """A session before each of its probes (the teacher's rows): the fast decoder encodes the
    shared context once and gives the tokens and log-probs that encoding every row whole
    gives (the transformers forward, and the fast decoder with the sharing switched off)."""
    gen_module = importlib.import_module("onthejob.model.generate")

    session = [{"role": "user", "content": "Here is a briefing: " + " ".join(QUESTIONS) * 2},
               {"role": "assistant", "content": "Noted, I will keep it in mind."}]
    full = [render_ids(lm.tokenizer, [*session, {"role": "user", "content": q}]) for q in QUESTIONS]
    shared = gen_module.shared_prefix(full)
    assert shared >= gen_module.SHARED_MIN and all(len(p) > shared for p in full)
    assert gen_module.shared_prefix(full[:1]) == 0 and gen_module.shared_prefix(_prompts(lm)) == 0
    prefilled = []
    steps = gen_module._steps

    def spy(*args, **kwargs):
        made = steps(*args, **kwargs)
        prefilled.append(getattr(made, "shared", 0))
        return made

    monkeypatch.setattr(gen_module, "_steps", spy)
    for params in (GREEDY, SamplingParams(max_tokens=16, temperature=0.9, seed=5)):
        once = generate(lm, full, params, fast=True)
        assert prefilled[-1] == shared
        assert_same(once, generate(lm, full, params, fast=False))
        monkeypatch.setattr(gen_module, "SHARED_MIN", 10**9)
        whole = generate(lm, full, params, fast=True)
        assert prefilled[-1] == 0
        assert_same(once, whole)
        monkeypatch.setattr(gen_module, "SHARED_MIN", 32)


@pytest.mark.slow  # compiling takes a minute or two on 2 cores
def test_compiled_steps_match_eager_and_are_shared_by_every_adapter(lm):
    """--compile: the same greedy tokens and log-probabilities as the eager steps, at batch 1
    and 4; a second adapter (another tenant) reuses the compiled code; a live adapter (a
    student in training) runs eagerly."""
    from torch._dynamo.utils import counters

    from onthejob.model import decoder

    prompts = _prompts(lm)
    attach(lm, "t1", LoraSpec(rank=4), trainable=False)
    _randomize_lora(lm, 0.3, seed=1)
    eager = [generate(lm, prompts[:1], GREEDY), generate(lm, prompts, GREEDY)]
    lm.decode_compiled = True
    compiled = [generate(lm, prompts[:1], GREEDY), generate(lm, prompts, GREEDY)]
    assert lm.decoder_cache.compiled and decoder._COMPILED
    for got, want in zip(compiled, eager, strict=True):
        assert_same(got, want)
    graphs = counters["stats"]["unique_graphs"]
    attach(lm, "t2", LoraSpec(rank=4), trainable=False)
    _randomize_lora(lm, 0.3, seed=2)
    activate(lm, ["t2"])
    lm.decode_compiled = False
    other = generate(lm, prompts, GREEDY)
    lm.decode_compiled = True
    assert_same(generate(lm, prompts, GREEDY), other)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
    assert other[0].token_ids != compiled[1][0].token_ids  # the adapter was switched
