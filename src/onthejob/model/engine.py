"""Generation engines: the small interface the server and the benchmarks generate through,
so that what runs the model is chosen by a flag (`--engine`) and measured.

An engine completes token-id prompts with a request's adapters (adapter directories,
stacked in order: shared first, then the tenant's). Engines are not thread-safe: the
server's worker (serve/engine.py) owns one and calls it from one thread.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from onthejob.model.adapters import use_adapter
from onthejob.model.batching import DecodeBatch
from onthejob.model.decoder import (
    INT8,
    FastDecoder,
    decoder_for,
    int8_works,
    native_bf16,
    unsupported,
)
from onthejob.model.generate import Completion, SamplingParams, generate, stream
from onthejob.model.load import LoadedModel
from onthejob.model.threads import run_in_thread

AdapterPaths = Sequence[str | os.PathLike]
# float32 reproduces the model exactly; bfloat16 reads half its bytes a decode step; int8
# (weight-only: int8 weights with a scale per output channel, bf16 activations) a quarter.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": INT8}


class GenerationEngine(Protocol):
    name: str

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 adapters: AdapterPaths = ()) -> list[Completion]:
        """Complete every prompt in one batch with `adapters` applied."""
        ...

    def stream(self, prompt: Sequence[int], params: SamplingParams,
               adapters: AdapterPaths = ()) -> Iterator[str | Completion]:
        """Yield text pieces as they are decoded, then the final Completion."""
        ...


class TorchEngine:
    """The in-process engine: onthejob's own generation path on the loaded torch model.

    It also offers continuous batching (`open_batch`, model/batching.py) where the fast decoder
    runs the model: the server's worker then lets requests join and leave between decode steps.
    The decoders (merged weights) of the last few adapter sets are kept, so a server that
    alternates between tenants does not merge their adapters again at every switch."""

    name = "torch"
    keep_decoders = 3  # each one holding a merged adapter is a copy of the weights

    def __init__(self, lm: LoadedModel, precision: str = "float32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        self.lm = lm
        lm.decode_dtype = PRECISIONS[precision]
        self._decoders: OrderedDict[tuple, FastDecoder] = OrderedDict()

    def can_batch(self) -> bool:
        """Whether continuous batching is available (the fast decoder runs this model)."""
        return unsupported(self.lm) is None

    def open_batch(self, adapters: AdapterPaths = ()) -> DecodeBatch:
        """An empty continuous batch whose rows are decoded with `adapters` applied."""
        key = tuple(_identity(p) for p in adapters)
        decoder = self._decoders.get(key)
        if decoder is None or decoder.dtype != self.lm.decode_dtype:
            use_adapter(self.lm, list(adapters) or None)
            decoder = decoder_for(self.lm, self.lm.decode_dtype)
            if decoder is None:
                raise ValueError(f"continuous batching needs the fast decoder: "
                                 f"{unsupported(self.lm)}")
            self._decoders[key] = decoder
            while len(self._decoders) > self.keep_decoders:
                self._decoders.popitem(last=False)
        self._decoders.move_to_end(key)
        return DecodeBatch(self.lm, decoder)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 adapters: AdapterPaths = ()) -> list[Completion]:
        use_adapter(self.lm, list(adapters) or None)
        return generate(self.lm, prompts, params)

    def stream(self, prompt: Sequence[int], params: SamplingParams,
               adapters: AdapterPaths = ()) -> Iterator[str | Completion]:
        use_adapter(self.lm, list(adapters) or None)
        return stream(self.lm, prompt, params)


def _identity(path: str | os.PathLike) -> tuple[str, int]:
    """An adapter directory by path and modification time (a rewritten adapter is new)."""
    folder = Path(path)
    try:
        stamp = max((f.stat().st_mtime_ns for f in folder.iterdir()), default=0)
    except OSError:
        stamp = -1
    return str(folder.resolve()), stamp


def _llamacpp(lm: LoadedModel, precision: str = "float32") -> GenerationEngine:
    from onthejob.model.llamacpp import LlamaCppEngine

    return LlamaCppEngine(lm, precision=precision)


ENGINES = {"torch": TorchEngine}
# llama.cpp (model/llamacpp.py) where llama-cpp-python is installed; found without importing it.
if importlib.util.find_spec("llama_cpp") is not None:
    ENGINES["llamacpp"] = _llamacpp
# Engines that exist but need something installed: the error says what.
OPTIONAL = {"llamacpp": "pip install llama-cpp-python==0.3.36 (built from source: needs cmake "
                        "and a C++ compiler)"}


def precision_problem(name: str, device: torch.device) -> str | None:
    """Why precision `name` cannot run on `device` (None when it can). bf16 runs everywhere
    on a CPU (emulated where it is not native: see precision_warning); int8 needs torch's
    CPU kernel."""
    if name not in PRECISIONS:
        return f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}"
    if name == "bfloat16" and device.type == "cuda" and not native_bf16(device):
        return "this GPU has no bf16 arithmetic: use float32"
    if name == "int8" and (device.type != "cpu" or not int8_works()):
        return ("int8 needs torch's CPU weight-only int8 kernel (_weight_int8pack_mm), which "
                "this torch build or device lacks: use float32 or bfloat16")
    return None


def precision_warning(name: str, device: torch.device) -> str | None:
    """What a user should know before running precision `name` on `device`, if anything."""
    if name == "bfloat16" and not native_bf16(device):
        return ("bf16 arithmetic is emulated on this CPU (no avx512_bf16 or amx_bf16): it "
                "decodes one stream faster than float32 (half the bytes) but batches of more "
                "than a few rows slower; `onthejob bench generate` measures both here")
    return None


AUTO_MARGIN = 1.1  # a lower precision is chosen when it decodes at least this many times faster
AUTO_BATCH = 8  # ... and is not slower than float32 at this batch (concurrent streams)
# Each rate is the median of this many timings, taken in turns (float32, bf16, int8, float32,
# ...) so that a noisy moment of the machine falls on all the precisions alike.
AUTO_REPEATS = 3
_PROBE = "Count from one to one hundred in words, separated by commas."


def decode_rate(lm: LoadedModel, dtype: torch.dtype, tokens: int = 24, batch: int = 1) -> float:
    """Greedy tokens per second (all rows together) at `batch` rows with the matrix products
    in `dtype`, after a short warm-up, measured on this machine now."""
    from onthejob.model.chat import render_ids

    before = lm.decode_dtype
    prompts = [render_ids(lm.tokenizer, [{"role": "user", "content": _PROBE}])] * batch
    try:
        lm.decode_dtype = dtype
        generate(lm, prompts, SamplingParams(max_tokens=4))
        started = time.perf_counter()
        done = generate(lm, prompts, SamplingParams(max_tokens=tokens))
        count = sum(len(c.token_ids) for c in done)
        return count / max(time.perf_counter() - started, 1e-9)
    finally:
        lm.decode_dtype = before


def pick_precision(lm: LoadedModel) -> tuple[str, dict[str, float]]:
    """`--precision auto`: float32 where no lower precision can run (precision_problem); else
    the one that decodes one stream fastest here, a lower one only when at least AUTO_MARGIN
    times float32's rate at batch 1 and at least float32's at batch AUTO_BATCH. Returns the
    choice and the measured rates (tokens/s, each the median of AUTO_REPEATS timings), keyed
    "name" (batch 1) and "name@8"."""
    usable = [n for n in PRECISIONS if precision_problem(n, lm.device) is None]
    if usable == ["float32"]:
        return "float32", {}
    timings: dict[str, list[float]] = {}

    def measure() -> None:
        for _ in range(AUTO_REPEATS):
            for name in usable:
                for key, batch in ((name, 1), (f"{name}@{AUTO_BATCH}", AUTO_BATCH)):
                    timings.setdefault(key, []).append(
                        decode_rate(lm, PRECISIONS[name], batch=batch))

    # in a thread that ends: run in the main thread, it would slow the engine thread that
    # serves afterwards (model/threads.py)
    run_in_thread(measure, "onthejob-precision")
    lm.decoder_cache = None  # the timing's weights are not kept
    rates = {key: statistics.median(values) for key, values in timings.items()}
    good = [n for n in usable if n != "float32"
            and rates[n] >= AUTO_MARGIN * rates["float32"]
            and rates[f"{n}@{AUTO_BATCH}"] >= rates[f"float32@{AUTO_BATCH}"]]
    return (max(good, key=rates.__getitem__) if good else "float32"), rates


def warm_compiled(lm: LoadedModel, batches: Sequence[int] = (1, 2)) -> float:
    """Switch lm to compiled decode steps (model/decoder.py) and compile them now, at each of
    `batches` (batch 1 is specialized; batch 2 covers every larger one up to the int8
    threshold), off the main thread; returns the seconds it took. The compiled code does not
    depend on the adapter, so it is warm for every tenant. On failure lm is left uncompiled
    and the error raised."""
    from onthejob.model.chat import render_ids

    prompt = render_ids(lm.tokenizer, [{"role": "user", "content": _PROBE}])
    started = time.perf_counter()
    lm.decode_compiled = True
    try:
        for rows in sorted(set(batches)):
            run_in_thread(lambda rows=rows: generate(lm, [prompt] * rows,
                                                     SamplingParams(max_tokens=3)))
    except Exception:
        lm.decode_compiled = False
        raise
    return time.perf_counter() - started


def make_engine(name: str, lm: LoadedModel, precision: str = "float32") -> GenerationEngine:
    """The engine called `name` over `lm`; ValueError naming the choices otherwise."""
    if name not in ENGINES:
        if name in OPTIONAL:
            raise ValueError(f"the {name} engine is not installed here: {OPTIONAL[name]}")
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(sorted(ENGINES))}")
    return ENGINES[name](lm, precision=precision)
