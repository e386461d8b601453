"""Continuous batching (model/batching.py): rows that join late, leave early, grow the cache
on either side and trim it decode exactly what each would alone."""

from __future__ import annotations

import pytest

from onthejob.model import SamplingParams, batching, generate, render_ids
from onthejob.model.engine import TorchEngine


def _prompt(lm, text):
    return render_ids(lm.tokenizer, [{"role": "user", "content": text}])


def test_rows_joining_and_leaving_decode_as_alone(tiny_lm, monkeypatch):
    monkeypatch.setattr(batching, "GROW", 4)  # grow and trim the cache often
    batch = TorchEngine(tiny_lm).open_batch()
    texts = ["hi", "a rather long question that pads every other row on the left", "x y"]
    plans = [SamplingParams(max_tokens=20, ignore_eos=True),
             SamplingParams(max_tokens=6, ignore_eos=True, stop=["zzz"]),
             SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)]
    joins = {0: [0], 3: [1], 5: [2]}  # step -> rows that join before it
    got: dict[int, object] = {}
    widths = []
    for step in range(40):
        for row in joins.get(step, []):
            batch.add(_prompt(tiny_lm, texts[row]), plans[row], row)
        if not len(batch):
            break
        for event in batch.step():
            if event.completion is not None:
                got[event.tag] = event.completion
        widths.append(batch.width)
    assert sorted(got) == [0, 1, 2] and not len(batch)
    assert min(widths[6:]) < max(widths)  # columns were trimmed after the long row left
    for row in range(3):
        alone = generate(tiny_lm, [_prompt(tiny_lm, texts[row])], plans[row])[0]
        assert got[row].token_ids == alone.token_ids, row
        assert got[row].logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_a_prompt_that_does_not_fit_changes_nothing(tiny_lm):
    batch = TorchEngine(tiny_lm).open_batch()
    batch.add(_prompt(tiny_lm, "hi"), SamplingParams(max_tokens=3), "ok")
    with pytest.raises(ValueError, match="context"):
        batch.add([1] * tiny_lm.context_length, SamplingParams(max_tokens=3), "long")
    events = [e for _ in range(4) for e in batch.step()]
    assert [e.tag for e in events if e.completion] == ["ok"]
