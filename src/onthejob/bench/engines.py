"""Greedy agreement between the torch engine and llama.cpp on the default model: 10 short
chat prompts, 32 new tokens each, without an adapter and with the same LoRA adapter (the
bench's: r=16 on every projection, random B), the adapter exported to GGUF by onthejob.

The torch model is the shipped Q4_1 GGUF dequantized to float32, so both engines hold the
same weights; they differ in arithmetic: llama.cpp quantizes the activations to 8 bits
(Q8_1 / Q8_0 blocks) for its quantized dot products, keeps the KV cache in f16 and adds the
LoRA delta in f32 beside the quantized product; torch computes in float32 throughout. So
where the two most likely next tokens are close, the engines may pick different ones, and
from there the texts part. The report gives, for each prompt, the tokens in common and, where
they part, torch's log-prob margin between its choice and llama.cpp's: small margins say the
difference is arithmetic, not a wrong adapter or layout (a wrong q/k permutation or scale
would part at once, with large margins, on every prompt).

Loads the real model in torch: run it under the heavy-work lock,
`flock /tmp/onthejob-heavy.lock env OMP_NUM_THREADS=1 python -m onthejob.bench.engines`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PROMPTS = [
    "What is the capital of France?", "Explain why the sky is blue.",
    "Write a haiku about autumn.", "List three uses for a paperclip.",
    "What is 12 times 7?", "Give me a tip for learning to cook.",
    "Describe a cat in one sentence.", "What does a compiler do?",
    "Name a famous painting and its painter.", "How do plants make food?",
]


def compare_runs(torch_runs, llama_runs) -> dict:
    """Agreement of two lists of Completions (torch's with top_logprobs >= 2)."""
    rows = []
    for t, c in zip(torch_runs, llama_runs, strict=True):
        n = 0
        while n < min(len(t.token_ids), len(c.token_ids)) and t.token_ids[n] == c.token_ids[n]:
            n += 1
        row = {"identical": t.token_ids == c.token_ids, "common_prefix": n,
               "torch_tokens": len(t.token_ids), "llamacpp_tokens": len(c.token_ids),
               "logprob_abs_diff": statistics.fmean(
                   abs(a - b) for a, b in zip(t.logprobs[:n], c.logprobs[:n], strict=True))
               if n else None}
        if n < min(len(t.token_ids), len(c.token_ids)):
            alts = dict(t.top_logprobs[n])
            mine = t.logprobs[n]
            theirs = alts.get(c.token_ids[n])
            # torch's margin between its own choice and llama.cpp's at the parting token
            # (None: llama.cpp's choice is not among torch's top alternatives).
            row["margin_at_parting"] = None if theirs is None else mine - theirs
        rows.append(row)
    margins = [r["margin_at_parting"] for r in rows if r.get("margin_at_parting") is not None]
    return {"identical": sum(r["identical"] for r in rows), "prompts": len(rows),
            "rows": rows, "median_margin_at_parting": statistics.median(margins) if margins
            else None}


def run(tokens: int = 32, threads: int | None = None) -> dict:
    import torch

    from onthejob.bench.generate import bench_adapter
    from onthejob.model import SamplingParams, load_model, render_ids
    from onthejob.model.engine import TorchEngine
    from onthejob.model.llamacpp import LlamaCppEngine

    if threads:
        torch.set_num_threads(threads)
    lm = load_model()
    prompts = [render_ids(lm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    out: dict = {"tokens": tokens, "prompts": PROMPTS,
                 "adapter_used": "LoRA r=16 on all projections, random B (std 0.02)"}
    with tempfile.TemporaryDirectory() as folder:
        adapter = bench_adapter(lm, folder)
        torch_engine = TorchEngine(lm)
        llama = LlamaCppEngine(lm, n_threads=torch.get_num_threads())
        try:
            for label, adapters in (("base", []), ("adapter", [adapter])):
                t = torch_engine.generate(prompts, SamplingParams(max_tokens=tokens,
                                                                  top_logprobs=8), adapters)
                c = llama.generate(prompts, SamplingParams(max_tokens=tokens), adapters)
                out[label] = compare_runs(t, c)
                out[label]["texts"] = [{"torch": a.text, "llamacpp": b.text}
                                       for a, b in zip(t, c, strict=True)]
        finally:
            llama.close()
    return out


def markdown(r: dict, command: str) -> str:
    lines = [f"# Greedy agreement: torch engine vs llama.cpp\n\nCommand: `{command}`\n",
             f"{len(r['prompts'])} chat prompts, {r['tokens']} new tokens, greedy, stopping at "
             f"the end of turn; adapter: {r['adapter_used']}.\n",
             "| | identical | tokens in common (each prompt) | torch's margin where they part "
             "(median, nats) | mean abs log-prob diff on common tokens |", "|---|---|---|---|---|"]
    for label in ("base", "adapter"):
        a = r[label]
        diffs = [x["logprob_abs_diff"] for x in a["rows"] if x["logprob_abs_diff"] is not None]
        margin = a["median_margin_at_parting"]
        lines.append(f"| {label} | {a['identical']}/{a['prompts']} | "
                     f"{[x['common_prefix'] for x in a['rows']]} | "
                     + ("-" if margin is None else f"{margin:.3f}") + " | "
                     + (f"{statistics.fmean(diffs):.4f}" if diffs else "-") + " |")
    return "\n".join(lines) + "\n\n" + (__doc__ or "").split("\n\n")[1] + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/engines-agree",
                        help="output prefix (.md, .json); default %(default)s")
    args = parser.parse_args(argv)
    r = run(args.tokens, args.threads)
    command = "python -m onthejob.bench.engines " + " ".join(
        sys.argv[1:] if argv is None else argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(r, indent=1))
    Path(args.out + ".md").write_text(markdown(r, command.strip()))
    print(markdown(r, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
