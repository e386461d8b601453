"""Generation throughput: onthejob's batched decoding vs transformers' model.generate one
prompt at a time, same prompts and the same number of new tokens; and model load times."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from onthejob.model import SamplingParams, generate, load_model, render_ids
from onthejob.model.load import convert_default_model

PROMPTS = [
    "Explain why the sky is blue.", "Write a short story about a robot.",
    "List five uses for a paperclip.", "Describe the water cycle.",
    "What makes a good friend?", "Summarize the plot of Cinderella.",
    "Give advice to a new programmer.", "Describe a busy market in the morning.",
]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(model: str | None, n_prompts: int, tokens: int) -> dict:
    load_cached = _timed(lambda: load_model(model))
    load_cold = None
    if model is None:
        with tempfile.TemporaryDirectory() as tmp:
            load_cold = _timed(lambda: convert_default_model(Path(tmp) / "m"))
    lm = load_model(model)
    tok = lm.tokenizer
    prompts = [render_ids(tok, [{"role": "user", "content": p}])
               for p in (PROMPTS * (n_prompts // len(PROMPTS) + 1))[:n_prompts]]
    # Forced length: no early stop, so every path produces exactly `tokens` per prompt.
    eos = tok.eos_token_id

    def hf_one_at_a_time():
        for p in prompts:
            with torch.no_grad():
                lm.model.generate(torch.tensor([p]), max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, pad_token_id=eos)

    def ours(batch: int):
        def go():
            for start in range(0, len(prompts), batch):
                generate(lm, prompts[start:start + batch],
                         SamplingParams(max_tokens=tokens, ignore_eos=True))
        return go

    generate(lm, prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    total = tokens * len(prompts)
    hf = _timed(hf_one_at_a_time)
    b1 = _timed(ours(1))
    b8 = _timed(ours(8))
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "model": lm.name, "prompts": len(prompts), "new_tokens_each": tokens,
        "hf_generate_tok_s": total / hf, "ours_batch1_tok_s": total / b1,
        "ours_batch8_tok_s": total / b8, "speedup_batch8": hf / b8, "speedup_batch1": hf / b1,
        "load_cached_s": load_cached, "load_cold_convert_s": load_cold,
    }


def markdown(r: dict, command: str) -> str:
    cold = f"{r['load_cold_convert_s']:.1f} s" if r["load_cold_convert_s"] else "n/a"
    return (f"# Generation throughput\n\nCommand: `{command}`  \nDate: {r['date']}; "
            f"machine: {r['machine']}; model {r['model']}; {r['prompts']} prompts x "
            f"{r['new_tokens_each']} new tokens (greedy, no early stop)\n\n"
            "| path | tokens/s | speedup vs model.generate |\n|---|---|---|\n"
            f"| transformers model.generate, one prompt at a time | {r['hf_generate_tok_s']:.1f} | 1.00 |\n"
            f"| onthejob generate, batch 1 | {r['ours_batch1_tok_s']:.1f} | {r['speedup_batch1']:.2f} |\n"
            f"| onthejob generate, batch 8 | {r['ours_batch8_tok_s']:.1f} | {r['speedup_batch8']:.2f} |\n\n"
            f"Model load: cached safetensors {r['load_cached_s']:.2f} s; cold (GGUF dequantize "
            f"and convert) {cold}.\n")
