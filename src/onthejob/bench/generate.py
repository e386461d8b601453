"""Generation throughput of an engine at batch 1, 8 and 32, with a LoRA adapter applied the way
the server and the trainer apply one, on the default model; and "before" figures from the
same measurement run on an older checkout, folded in for the speedup.

The measuring code uses only what every version of the model layer has (load_model,
render_ids, generate, SamplingParams, the adapters module), so the very same file measures
an older checkout: `python PATH/TO/THIS/generate.py --out before` with PYTHONPATH at the old
tree's src (Python then imports the old onthejob), then
`onthejob bench generate --before before.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from onthejob.bench import names
from onthejob.model import SamplingParams, generate, load_model, render_ids
from onthejob.model.adapters import LoraSpec, random_lora, save, use_adapter

PROMPTS = [
    "Explain why the sky is blue.", "Write a short story about a robot.",
    "List five uses for a paperclip.", "Describe the water cycle.",
    "What makes a good friend?", "Summarize the plot of Cinderella.",
    "Give advice to a new programmer.", "Describe a busy market in the morning.",
]
BATCHES = (1, 8, 32)


def bench_adapter(lm, folder: str) -> str:
    """A LoRA like the trainer's (r=16 on every projection) with small random B, so it changes
    the outputs; saved as an adapter directory and detached again."""
    random_lora(lm, "bench", LoraSpec(), seed=0, scale=0.02)
    path = str(Path(folder) / "bench-adapter")
    save(lm.model, "bench", path)
    lm.model = lm.model.unload()
    return path


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) of `repeats` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def measure(gen: Callable[[list[list[int]], SamplingParams], list], prompts: list[list[int]],
            batches: Sequence[int], tokens: int, repeats: int) -> dict:
    """tokens/s of one generate call per batch size (new tokens, prefill included), the median
    of `repeats`: over the process's CPU time (`tok_s`; on a CPU shared with other jobs the
    figure that measures the code, with one thread) and over wall time (`wall_tok_s`); the
    time to the first token at batch 1; and the greedy token ids of every prompt at batch 8,
    to compare engines and versions."""
    forced = SamplingParams(max_tokens=tokens, ignore_eos=True)
    gen(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    out: dict = {"tok_s": {}, "wall_tok_s": {}}
    for b in batches:
        rows = [prompts[i % len(prompts)] for i in range(b)]
        wall, cpu = _median_time(lambda rows=rows: gen(rows, forced), repeats)
        out["tok_s"][str(b)] = b * tokens / cpu
        out["wall_tok_s"][str(b)] = b * tokens / wall
    out["first_token_wall_s"], out["first_token_s"] = _median_time(
        lambda: gen(prompts[:1], SamplingParams(max_tokens=1)), repeats)
    greedy = gen(prompts[:8], SamplingParams(max_tokens=tokens))
    out["greedy_ids"] = [c.token_ids for c in greedy]
    return out


def measure_shared(lm, adapter: str, context_tokens: int, rows: int = 16, tokens: int = 32,
                   repeats: int = 2) -> dict:
    """The teacher's rows: `rows` questions after one session of about `context_tokens` tokens,
    in one batch. tokens/s (CPU time) with the shared context encoded once, and with every row
    encoded whole (the sharing switched off), and whether both give the same tokens."""
    module = importlib.import_module("onthejob.model.generate")
    filler = " ".join(PROMPTS)
    words = []
    while len(lm.tokenizer.encode(" ".join(words))) < context_tokens:
        words += filler.split()
    session = [{"role": "user", "content": "Notes for our work: " + " ".join(words)},
               {"role": "assistant", "content": "Noted."}]
    prompts = [render_ids(lm.tokenizer, [*session, {"role": "user", "content": PROMPTS[i % 8]}])
               for i in range(rows)]
    forced = SamplingParams(max_tokens=tokens, ignore_eos=True)
    use_adapter(lm, [adapter])
    out = {"context_tokens": len(prompts[0]), "rows": rows,
           "shared_tokens": module.shared_prefix(prompts)}
    saved = module.SHARED_MIN
    try:
        for label, minimum in (("shared", saved), ("whole", 10**9)):
            module.SHARED_MIN = minimum
            generate(lm, prompts[:2], SamplingParams(max_tokens=2))  # warm-up
            _, cpu = _median_time(lambda: generate(lm, prompts, forced), repeats)
            out[f"{label}_tok_s"] = rows * tokens / cpu
            out[f"{label}_ids"] = [c.token_ids for c in generate(lm, prompts, forced)]
    finally:
        module.SHARED_MIN = saved
        use_adapter(lm, None)
    out["speedup"] = out["shared_tok_s"] / out["whole_tok_s"]
    out["identical"] = sum(a == b for a, b in zip(out.pop("shared_ids"), out.pop("whole_ids"),
                                                  strict=True))
    return out


def run(engine: str | None, precisions: Sequence[str], batches: Sequence[int] = BATCHES,
        tokens: int = 32, repeats: int = 3, model: str | None = None,
        shared_context: int = 0, compiled: bool = False,
        say: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict:
    """Measure `engine` (by name, from model/engine.py; several comma-separated, e.g.
    "torch,llamacpp", are measured in turn on the same prompts and adapter) at each precision
    (llama.cpp once, on the GGUF's own weights); engine None measures the plain generate() of
    whatever onthejob is imported (an older checkout has no engines). `compiled` adds, after
    each torch precision, the same precision with compiled decode steps (its compile time,
    warm-up included, in the run's "compile_s")."""
    started = time.perf_counter()
    lm = load_model(model)
    load_s = time.perf_counter() - started
    prompts = [render_ids(lm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    result: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code": _code_version(), "model": lm.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "tokens_each": tokens, "repeats": repeats, "load_cached_s": load_s,
        "adapter": "LoRA r=16 on all projections, random B (std 0.02)", "runs": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        adapter = bench_adapter(lm, folder)
        if shared_context:
            result["shared"] = measure_shared(lm, adapter, shared_context, tokens=tokens)
        for name in [None] if engine is None else names(engine):
            # llama.cpp runs the GGUF's own quantized weights: one run, whatever --precisions.
            variants = [(p, False) for p in precisions]
            if name == "llamacpp":
                variants = variants[:1]
            elif compiled and name == "torch":
                variants = [(p, c) for p in precisions for c in (False, True)]
            for precision, compile_it in variants:
                begun = time.perf_counter()
                label, gen, close = _runner(name, precision, lm, adapter, max(batches),
                                            max(len(p) for p in prompts) + tokens)
                try:
                    compile_s = None
                    if compile_it:  # every batch size measured, so that no timed call compiles
                        from onthejob.model.engine import warm_compiled

                        compile_s = warm_compiled(lm, (1, 2, *batches))
                    figures = measure(gen, prompts, batches, tokens, repeats)
                    if compile_it:
                        label, figures["compile_s"] = f"{label} compiled", compile_s
                    result["runs"][label] = figures
                    say(f"{label}: batch 1 {figures['wall_tok_s'][str(batches[0])]:.1f} "
                        f"tokens/s (wall), batch {batches[-1]} "
                        f"{figures['wall_tok_s'][str(batches[-1])]:.1f}; measured in "
                        f"{time.perf_counter() - begun:.0f} s, {time.perf_counter() - started:.0f}"
                        " s so far")
                finally:
                    close()
                    lm.decode_compiled = False
                use_adapter(lm, None)
                lm.decoder_cache = None  # free this precision's weights before the next
        result["agreement"] = agreement(result["runs"])
    return result



def _runner(engine: str | None, precision: str, lm, adapter: str, batch: int = 32,
            context: int = 512):
    """(label, gen(rows, params), close()) for one run: the plain generate() of whatever
    onthejob is imported (engine None: an older checkout has no engines), or an engine
    (llama.cpp with `batch` sequences of `context` tokens, so that a whole batch shares each
    decode step)."""
    if engine is None:
        if precision != "float32":
            raise ValueError("without an engine only float32 can be measured")

        def gen(rows, params):
            use_adapter(lm, [adapter])
            return generate(lm, rows, params)

        return f"generate {precision}", gen, lambda: None
    from onthejob.model.engine import make_engine

    if engine == "llamacpp":
        from onthejob.model.llamacpp import LlamaCppEngine

        backend = LlamaCppEngine(lm, max_batch=batch, seq_context=-(-context // 256) * 256)
        label = f"llamacpp {Path(backend.model_path).stem.rsplit('.', 1)[-1]}"
    else:
        backend = make_engine(engine, lm, precision=precision)
        label = f"{engine} {precision}"

    def gen(rows, params):
        return backend.generate(rows, params, [adapter])

    return label, gen, getattr(backend, "close", lambda: None)


def agreement(runs: dict) -> dict:
    """For each run that is not the torch float32 run: of the greedy answers (with the same
    adapter), how many are token-identical to torch float32's, and how many of the first
    tokens agree (where the engines part ways)."""
    ref = runs.get("torch float32")
    if ref is None:
        return {}
    out = {}
    for label, r in runs.items():
        if label == "torch float32" or "greedy_ids" not in r:
            continue
        pairs = list(zip(r["greedy_ids"], ref["greedy_ids"], strict=True))
        prefix = []
        for a, b in pairs:
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            prefix.append(n)
        out[label] = {"identical": f"{sum(a == b for a, b in pairs)}/{len(pairs)}",
                      "common_prefix_tokens": prefix}
    return out


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def compare(after: dict, before: dict | None) -> dict:
    """Speedups of every run in `after` over the float32 run in `before`, per batch size, and
    how many greedy outputs are token-identical to it."""
    if not before:
        return {}
    base = next(iter(before["runs"].values()))
    out = {}
    for label, run_ in after["runs"].items():
        same = sum(a == b for a, b in zip(run_["greedy_ids"], base["greedy_ids"], strict=True))
        out[label] = {"speedup": {b: run_["tok_s"][b] / base["tok_s"][b]
                                  for b in run_["tok_s"] if b in base["tok_s"]},
                      "greedy_identical": f"{same}/{len(base['greedy_ids'])}"}
    return out


def shared_markdown(r: dict) -> str:
    return (f"\nTeacher rows (`--shared-context`): {r['rows']} questions after one session, "
            f"{r['context_tokens']} tokens a prompt of which {r['shared_tokens']} shared: "
            f"{r['shared_tok_s']:.1f} tokens/s with the shared context encoded once, "
            f"{r['whole_tok_s']:.1f} with every row encoded whole: **{r['speedup']:.2f}x**; "
            f"{r['identical']} of {r['rows']} greedy answers token-identical.\n")


def markdown(after: dict, before: dict | None, command: str, before_command: str | None) -> str:
    if not after["runs"]:
        return (f"# Generation throughput\n\nCommand: `{command}`  \nDate: {after['date']}; "
                f"machine: {after['machine']}; model {after['model']}.\n"
                + (shared_markdown(after["shared"]) if after.get("shared") else ""))
    speed = compare(after, before)
    batches = list(next(iter(after["runs"].values()))["tok_s"])
    head = ("| run | " + " | ".join(f"batch {b} tok/s" for b in batches)
            + " | first token (CPU s) | greedy = before |\n" + "|---" * (len(batches) + 3) + "|\n")
    lines = []
    if before:
        for label, r in before["runs"].items():
            lines.append(f"| before ({before['code']}): {label} | "
                         + " | ".join(f"{r['tok_s'][b]:.1f}" for b in batches)
                         + f" | {r['first_token_s']:.3f} | |")
    for label, r in after["runs"].items():
        cells = []
        for b in batches:
            cell = f"{r['tok_s'][b]:.1f}"
            if label in speed and b in speed[label]["speedup"]:
                cell += f" ({speed[label]['speedup'][b]:.2f}x)"
            cells.append(cell)
        same = speed.get(label, {}).get("greedy_identical", "")
        lines.append(f"| after ({after['code']}): {label} | " + " | ".join(cells)
                     + f" | {r['first_token_s']:.3f} | {same} |")
    text = (f"# Generation throughput\n\nCommand: `{command}`  \n")
    if before_command:
        text += f"Before: `{before_command}`  \n"
    text += (f"Date: {after['date']}; machine: {after['machine']}; model {after['model']}; "
             f"{after['tokens_each']} new tokens a row (greedy, no early stop), the median of "
             f"{after['repeats']} calls; adapter: {after['adapter']}. tokens/s = new tokens over "
             "the CPU time of the process (one thread) during one generate call, prefill "
             "included: the machine is shared with other jobs, so CPU time, not wall time, "
             "measures the code. Wall-clock figures of the same calls are below.\n\n" + head
             + "\n".join(lines) + "\n")
    if before and "8" in batches:
        label = next(iter(after["runs"]))
        text += f"\ngenerate speedup batch 8: {speed[label]['speedup']['8']:.1f}x ({label})\n"
        for label in list(after["runs"])[1:]:
            text += f"generate speedup batch 8, {label}: {speed[label]['speedup']['8']:.1f}x\n"
    walls = [(f"before ({before['code']}): {label}", r) for label, r in before["runs"].items()] \
        if before else []
    walls += [(f"after ({after['code']}): {label}", r) for label, r in after["runs"].items()]
    text += ("\nWall clock (tokens/s; the scheduler's share of the CPU included):\n\n| run | "
             + " | ".join(f"batch {b}" for b in batches) + " | first token (s) |\n"
             + "|---" * (len(batches) + 2) + "|\n"
             + "\n".join(f"| {name} | " + " | ".join(f"{r['wall_tok_s'][b]:.1f}" for b in batches)
                         + f" | {r['first_token_wall_s']:.3f} |" for name, r in walls) + "\n")
    text += (f"\nModel load (cached safetensors): {after['load_cached_s']:.2f} s. "
             "'greedy = before': of 8 prompts, how many greedy answers are token-identical to "
             "the before run's.\n")
    for label, r in after["runs"].items():
        if r.get("compile_s") is not None:
            text += (f"\n{label}: compiled in {r['compile_s']:.0f} s (every batch size measured "
                     "warmed up first; inductor's on-disk cache makes later processes faster).\n")
    for label, a in (after.get("agreement") or {}).items():
        text += (f"\nGreedy agreement, {label} vs torch float32 (same adapter, "
                 f"{after['tokens_each']} tokens): {a['identical']} identical; tokens in common "
                 f"before they part: {a['common_prefix_tokens']}.\n")
    if after.get("shared"):
        text += shared_markdown(after["shared"])
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run as a script against any checkout (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output prefix (PREFIX.json)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(None, ["float32"], tokens=args.tokens, repeats=args.repeats)
    result["command"] = "python " + " ".join(sys.argv)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
