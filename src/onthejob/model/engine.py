"""Generation engines: the small interface the server and the benchmarks generate through,
so that what runs the model is chosen by a flag (`--engine`) and measured.

An engine completes token-id prompts with a request's adapters (adapter directories,
stacked in order: shared first, then the tenant's). Engines are not thread-safe: the
server's worker (serve/engine.py) owns one and calls it from one thread.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from onthejob.model.adapters import use_adapter
from onthejob.model.batching import DecodeBatch
from onthejob.model.decoder import FastDecoder, decoder_for, unsupported
from onthejob.model.generate import Completion, SamplingParams, generate, stream
from onthejob.model.load import LoadedModel

AdapterPaths = Sequence[str | os.PathLike]
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native on `device` (CUDA with bf16, or a CPU with AVX512-BF16
    or AMX); elsewhere it is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


AUTO_MARGIN = 1.1  # bf16 is chosen when it decodes at least this many times faster
_PROBE = "Count from one to one hundred in words, separated by commas."


def decode_rate(lm: LoadedModel, dtype: torch.dtype, tokens: int = 24) -> float:
    """Greedy tokens per second at batch 1 with the matrix products in `dtype`, after a short
    warm-up: what one stream of the server gets, measured on this machine now."""
    from onthejob.model.chat import render_ids

    before = lm.decode_dtype
    prompt = render_ids(lm.tokenizer, [{"role": "user", "content": _PROBE}])
    try:
        lm.decode_dtype = dtype
        generate(lm, [prompt], SamplingParams(max_tokens=4))
        started = time.perf_counter()
        done = generate(lm, [prompt], SamplingParams(max_tokens=tokens))[0]
        return len(done.token_ids) / max(time.perf_counter() - started, 1e-9)
    finally:
        lm.decode_dtype = before


def pick_precision(lm: LoadedModel) -> tuple[str, dict[str, float]]:
    """`--precision auto`: float32 where bf16 is not native; else whichever of the two decodes
    faster here (bfloat16 only when at least AUTO_MARGIN times float32's rate), with the
    measured rates (tokens/s at batch 1)."""
    if not native_bf16(lm.device):
        return "float32", {}
    rates = {name: decode_rate(lm, dtype) for name, dtype in PRECISIONS.items()}
    fast = rates["bfloat16"] >= AUTO_MARGIN * rates["float32"]
    return ("bfloat16" if fast else "float32"), rates


def make_engine(name: str, lm: LoadedModel, precision: str = "float32") -> GenerationEngine:
    """The engine called `name` over `lm`; ValueError naming the choices otherwise."""
    if name not in ENGINES:
        if name in OPTIONAL:
            raise ValueError(f"the {name} engine is not installed here: {OPTIONAL[name]}")
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(sorted(ENGINES))}")
    return ENGINES[name](lm, precision=precision)
