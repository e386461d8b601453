import pytest
import torch

from onthejob.model import (
    ContextLengthError,
    SamplingParams,
    generate,
    render_ids,
    render_text,
    stream,
)


def test_render_uses_chat_template(tiny_lm):
    text = render_text(tiny_lm.tokenizer, [{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = render_ids(tiny_lm.tokenizer, [{"role": "user", "content": "hi"}])
    assert tiny_lm.tokenizer.decode(ids) == text


def test_render_rejects_bad_messages(tiny_lm):
    with pytest.raises(ValueError, match="role"):
        render_ids(tiny_lm.tokenizer, [{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="empty"):
        render_ids(tiny_lm.tokenizer, [])


def test_batched_greedy_matches_one_at_a_time_and_hf(tiny_lm):
    tok = tiny_lm.tokenizer
    prompts = [render_ids(tok, [{"role": "user", "content": q}]) for q in ["a", "longer question here", "b c"]]
    params = SamplingParams(max_tokens=6)
    batched = generate(tiny_lm, prompts, params)
    for prompt, out in zip(prompts, batched, strict=True):
        single = generate(tiny_lm, [prompt], params)[0]
        assert single.token_ids == out.token_ids
        hf = tiny_lm.model.generate(torch.tensor([prompt]), max_new_tokens=len(out.token_ids),
                                    do_sample=False, pad_token_id=tok.pad_token_id)
        assert hf[0, len(prompt):].tolist()[: len(out.token_ids)] == out.token_ids
        assert len(out.logprobs) == len(out.token_ids)
        assert all(lp <= 0 for lp in out.logprobs)


def test_logprobs_are_the_models(tiny_lm):
    tok = tiny_lm.tokenizer
    prompt = render_ids(tok, [{"role": "user", "content": "hello"}])
    out = generate(tiny_lm, [prompt], SamplingParams(max_tokens=4, temperature=1.0, seed=3))[0]
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = tiny_lm.model(full).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    want = [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(want, abs=1e-4)


def test_top_logprobs_are_the_models_most_likely_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    prompt = render_ids(tok, [{"role": "user", "content": "hello"}])
    params = SamplingParams(max_tokens=5, top_logprobs=4)
    out = generate(tiny_lm, [prompt, prompt[1:]], params)[0]
    assert len(out.top_logprobs) == len(out.token_ids) == 5
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(tiny_lm.model(full).logits[0].float(), -1)
    for i, (token, top) in enumerate(zip(out.token_ids, out.top_logprobs, strict=True)):
        want = lp[len(prompt) - 1 + i].topk(4)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)
        assert top[0] == (token, pytest.approx(out.logprobs[i]))  # greedy: the most likely
    streamed = list(stream(tiny_lm, prompt, params))[-1]
    assert [[t for t, _ in top] for top in streamed.top_logprobs] == \
        [[t for t, _ in top] for top in out.top_logprobs]
    assert generate(tiny_lm, [prompt], SamplingParams(max_tokens=2))[0].top_logprobs is None
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=65).validate()


def test_sampling_is_seeded(tiny_lm):
    prompt = render_ids(tiny_lm.tokenizer, [{"role": "user", "content": "x"}])
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert generate(tiny_lm, [prompt], p)[0].token_ids == generate(tiny_lm, [prompt], p)[0].token_ids


def test_stop_strings_and_stream_agree(tiny_lm):
    prompt = render_ids(tiny_lm.tokenizer, [{"role": "user", "content": "x"}])
    free = generate(tiny_lm, [prompt], SamplingParams(max_tokens=12))[0]
    assert len(free.text) > 2
    stop = free.text[2:4]
    cut = generate(tiny_lm, [prompt], SamplingParams(max_tokens=12, stop=[stop]))[0]
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.finish_reason == "stop"
    pieces = list(stream(tiny_lm, prompt, SamplingParams(max_tokens=12)))
    final = pieces[-1]
    assert "".join(pieces[:-1]) == final.text == free.text


def test_context_length_refused_with_numbers(tiny_lm):
    prompt = [1] * (tiny_lm.context_length - 3)
    with pytest.raises(ContextLengthError, match="context is 1024 tokens"):
        generate(tiny_lm, [prompt], SamplingParams(max_tokens=10))


def test_bad_sampling_params(tiny_lm):
    for bad in (SamplingParams(max_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=0)):
        with pytest.raises(ValueError):
            bad.validate()


@pytest.mark.slow
def test_default_model_answers(real_lm):
    prompt = render_ids(real_lm.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    out = generate(real_lm, [prompt], SamplingParams(max_tokens=20))[0]
    assert "Paris" in out.text


def test_pieces_carry_their_tokens_through_concatenation():
    from onthejob.model.generate import Piece

    a = Piece("Hel", [1, 2], [-0.5, -0.25], [[(1, -0.5)], [(2, -0.25)]])
    b = Piece("lo", [3], [-1.0], [[(3, -1.0)]])
    for joined in (a + b, ("" + a) + b, (a + "") + b):
        assert joined == "Hello" and isinstance(joined, Piece)
        assert joined.token_ids == [1, 2, 3] and joined.logprobs == [-0.5, -0.25, -1.0]
        assert joined.top_logprobs == [[(1, -0.5)], [(2, -0.25)], [(3, -1.0)]]
    assert (Piece("x") + "y").top_logprobs is None and str(a) == "Hel"
