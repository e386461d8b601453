"""The llama.cpp generation engine (`--engine llamacpp`): the shipped GGUF (the model's own
quantized file) run by llama.cpp through llama-cpp-python's low-level C API, with each
request's adapters applied as GGUF LoRA files.

Adapters and concurrency. llama.cpp keeps the LoRA set on the *context* (`llama_set_adapters_
lora(ctx, adapters, n, scales)`), not per sequence: every sequence decoded in one
`llama_decode` call uses the same adapters, so two tenants cannot share a decode step
(llama-server, likewise, batches only requests whose LoRA lists are equal). This engine
therefore (1) gives every request its own sequences (seq ids from a pool, each with its own
KV stream, emptied when the request ends), (2) sets the request's own adapter list before *every* llama_decode
call it makes (a no-op inside llama.cpp when unchanged), and (3) decodes together only the
prompts of one `generate` call, which share their adapters. A suspended stream resumed after
another request ran therefore decodes with its own adapters again, and the KV cells it reads
were all computed with them. No prefix cache is shared between requests: cached keys and
values computed under one tenant's adapter would otherwise leak into another's.

Each adapter directory (PEFT) is exported to GGUF once (model/gguf_lora.py), cached by path,
modification time and size, and loaded into llama.cpp once; at most `max_loaded` stay loaded.

Sampling is done here in numpy on llama.cpp's logits, so that log-probs (of the untempered
distribution, like the torch engine's), top_logprobs, temperature / top-p and seeds behave
as the torch engine's do. Text is decoded with the Hugging Face tokenizer both engines share
(the GGUF's vocabulary is the same), so stop strings and pieces match the torch engine's.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onthejob.model.adapters import AdapterError
from onthejob.model.chat import end_of_turn_ids
from onthejob.model.generate import Completion, ContextLengthError, SamplingParams, first_stop
from onthejob.model.gguf_lora import base_model, export_gguf, shipped_gguf

log = logging.getLogger(__name__)

INSTALL = ("pip install llama-cpp-python==0.3.36 (built from source: needs cmake and a C++ "
           "compiler, about 15-30 minutes on 2 cores)")


def unavailable() -> str | None:
    """Why the llama.cpp engine cannot run here (llama-cpp-python missing), or None."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an import that fails for any reason
        return f"llama-cpp-python is not importable ({exc}): {INSTALL}"
    return None


def _lib():
    reason = unavailable()
    if reason:
        raise RuntimeError(f"the llamacpp engine needs llama-cpp-python: {reason}")
    import llama_cpp

    try:  # its import installs a log callback that prints everything; errors only
        from llama_cpp import _logger

        _logger.set_verbose(False)
    except Exception:  # noqa: BLE001 - only the log level; harmless if the layout changed
        pass
    return llama_cpp


@dataclass
class _Row:
    prompt: list[int]
    seq: int
    pos: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    alive: bool = True
    reason: str = "length"
    text: str | None = None


@dataclass
class _Loaded:
    gguf: Path
    handle: object  # llama_adapter_lora_p
    users: int = 0


class LlamaCppEngine:
    """Generation with llama.cpp on the default model's GGUF (see the module docstring)."""

    name = "llamacpp"

    def __init__(self, lm=None, precision: str = "float32", *,
                 model_path: str | os.PathLike | None = None, tokenizer=None,
                 n_threads: int | None = None, max_batch: int = 4,
                 seq_context: int | None = None, n_batch: int = 2048, max_loaded: int = 8,
                 cache_dir: str | os.PathLike | None = None) -> None:
        if precision != "float32":
            raise ValueError("the llamacpp engine computes with the GGUF's own quantized weights; "
                             f"--precision {precision} applies to the torch engine only")
        from onthejob.model.load import DEFAULT_MODEL_NAME

        if lm is not None and model_path is None and lm.name != DEFAULT_MODEL_NAME:
            raise ValueError(f"the llamacpp engine runs the default model's GGUF, but the model "
                             f"loaded is {lm.name}: serve it with --engine torch")
        lib = _lib()
        self._lib = lib
        self.model_path = Path(model_path) if model_path else shipped_gguf()
        if tokenizer is None:
            if lm is not None:
                tokenizer = lm.tokenizer
            else:
                from onthejob.model.load import load_tokenizer

                tokenizer = load_tokenizer()
        self.tokenizer = tokenizer
        self._stops = end_of_turn_ids(tokenizer)
        if n_threads is None:
            import torch

            n_threads = torch.get_num_threads()
        self.n_threads = n_threads
        self.max_batch, self.n_batch, self.max_loaded = max_batch, n_batch, max_loaded
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        self._model = lib.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.model_path}")
        self.context_length = int(lib.llama_model_n_ctx_train(self._model))
        seq_context = min(seq_context or self.context_length, self.context_length)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = seq_context * max_batch
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(512, n_batch)
        cparams.n_seq_max = max_batch
        cparams.n_threads = cparams.n_threads_batch = n_threads
        # Every sequence its own KV stream (seq_context cells each): a sequence's logits then
        # do not depend on what else shares its decode calls (measured: with one unified
        # pool they moved by up to 1 logit when another sequence joined the batch), and no
        # request's cells ever sit in another's attention.
        cparams.kv_unified = False
        cparams.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self.seq_context = min(int(lib.llama_n_ctx_seq(self._ctx)), self.context_length)
        self._mem = lib.llama_get_memory(self._ctx)
        vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        if len(tokenizer) > self.n_vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {self.model_path} "
                             f"{self.n_vocab}: they are not the same model")
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._free_seqs = list(range(max_batch))
        self._base = base_model(self.model_path)
        self._tmp = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="onthejob-gguf-lora-")
            cache_dir = self._tmp.name
        self.cache_dir = Path(cache_dir)
        self._loaded: OrderedDict[tuple, _Loaded] = OrderedDict()
        self._current: tuple = ()
        self.decode_calls = 0  # for tests and metrics
        self.exports = 0

    # -- adapters ------------------------------------------------------------------------

    def _key(self, path: str | os.PathLike) -> tuple:
        path = Path(path).resolve()
        try:
            st = (path / "adapter_model.safetensors").stat()
        except OSError as exc:
            raise AdapterError(f"adapter {path} is missing its weights: {exc}") from exc
        return (str(path), st.st_mtime_ns, st.st_size)

    def _acquire(self, paths: Sequence[str | os.PathLike]) -> list[tuple]:
        """Load (export once) every adapter of a request and pin it until _release."""
        keys = []
        try:
            for path in paths:
                key = self._key(path)
                loaded = self._loaded.get(key)
                if loaded is None:
                    loaded = self._load(key)
                self._loaded.move_to_end(key)
                loaded.users += 1
                keys.append(key)
        except Exception:
            self._release(keys)
            raise
        self._evict()
        return keys

    def _load(self, key: tuple) -> _Loaded:
        path = key[0]
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        file = self.cache_dir / f"{Path(path).name}-{digest}.gguf"
        if not file.exists():
            export_gguf(path, file, self._base)
            self.exports += 1
        handle = self._lib.llama_adapter_lora_init(self._model, str(file).encode())
        if not handle:
            raise AdapterError(f"llama.cpp refused the adapter {file} exported from {path}")
        loaded = _Loaded(file, handle)
        self._loaded[key] = loaded
        return loaded

    def _release(self, keys: Sequence[tuple]) -> None:
        for key in keys:
            if key in self._loaded:
                self._loaded[key].users -= 1

    def _evict(self) -> None:
        idle = [k for k, v in self._loaded.items() if v.users == 0]
        for key in idle[: max(0, len(self._loaded) - self.max_loaded)]:
            loaded = self._loaded.pop(key)
            if key in self._current:  # never free what the context still points at
                self._set(())
            self._lib.llama_adapter_lora_free(loaded.handle)
            try:
                loaded.gguf.unlink()
            except OSError:
                pass

    def _set(self, keys: tuple) -> None:
        """Make exactly the adapters `keys` the context's LoRA set (scale 1 each: the
        alpha / rank of each file is applied by llama.cpp)."""
        lib = self._lib
        n = len(keys)
        if n:
            handles = (lib.llama_adapter_lora_p_ctypes * n)(*[self._loaded[k].handle for k in keys])
            scales = (ctypes.c_float * n)(*([1.0] * n))
            rc = lib.llama_set_adapters_lora(self._ctx, handles, n, scales)
        else:
            rc = lib.llama_set_adapters_lora(self._ctx, None, 0, None)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not set the adapters (code {rc})")
        self._current = keys

    @property
    def applied(self) -> list[str]:
        """The adapter directories the context holds now (for tests)."""
        return [k[0] for k in self._current]

    # -- decoding ------------------------------------------------------------------------

    def _decode(self, entries: list[tuple[int, int, int, bool]], keys: tuple) -> np.ndarray:
        """Decode (token, position, seq, wants logits) entries with the adapters `keys`;
        return the logits of the entries that want them, in order (rows, vocab)."""
        lib, batch = self._lib, self._batch
        out: list[np.ndarray] = []
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start:start + self.n_batch]
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            batch.n_tokens = len(chunk)
            if keys != self._current:
                self._set(keys)
            rc = lib.llama_decode(self._ctx, batch)
            self.decode_calls += 1
            if rc != 0:
                raise RuntimeError(f"llama_decode failed (code {rc}): "
                                   + ("no room in the KV cache" if rc == 1 else "see stderr"))
            for i, (_, _, _, logits) in enumerate(chunk):
                if logits:
                    ptr = lib.llama_get_logits_ith(self._ctx, i)
                    out.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return np.stack(out) if out else np.empty((0, self.n_vocab), np.float32)

    def _check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("a prompt has no tokens")
        limit = self.seq_context
        if len(prompt) + params.max_tokens > limit:
            whose = "the model's" if limit == self.context_length else "the llama.cpp engine's"
            raise ContextLengthError(
                f"the prompt is {len(prompt)} tokens and max_tokens is {params.max_tokens}, "
                f"but {whose} context is {limit} tokens: shorten the prompt or lower "
                f"max_tokens (at most {max(limit - len(prompt), 0)} tokens can be generated "
                "after this prompt)")
        if any(not 0 <= t < self.n_vocab for t in prompt):
            raise ValueError(f"a prompt token is outside the vocabulary (0..{self.n_vocab - 1})")

    def _groups(self, n: int) -> list[list[int]]:
        """Row indices decoded together: as many as there are free sequences (max_batch)."""
        size = max(1, min(self.max_batch, len(self._free_seqs)))
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def _reserve(self, n: int) -> list[int]:
        if n > len(self._free_seqs):
            raise RuntimeError(
                f"the llama.cpp engine is busy: {self.max_batch - len(self._free_seqs)} of its "
                f"{self.max_batch} sequences belong to unfinished requests (streams not yet "
                f"read to the end); this call needs {n}")
        return [self._free_seqs.pop() for _ in range(n)]

    def _pick(self, logits: np.ndarray, params: SamplingParams, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, float]]] | None]:
        """Tokens, their log-probs (untempered) and, if asked, the top log-probs of each row of
        `logits` (rows, vocab): argmax when greedy, else temperature / top-p sampling."""
        x = logits.astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
        if params.temperature == 0.0:
            tokens = x.argmax(axis=1)
        else:
            tokens = np.empty(len(x), dtype=np.int64)
            for j, row in enumerate(x / params.temperature):
                probs = np.exp(row - row.max())
                probs /= probs.sum()
                if params.top_p < 1.0:
                    order = np.argsort(-probs, kind="stable")
                    sorted_p = probs[order]
                    kept = sorted_p * (np.cumsum(sorted_p) - sorted_p < params.top_p)
                    tokens[j] = order[rng.choice(len(kept), p=kept / kept.sum())]
                else:
                    tokens[j] = rng.choice(len(probs), p=probs)
        rows = np.arange(len(x))
        logprobs = x[rows, tokens] - lse
        tops = None
        if params.top_logprobs:
            k = params.top_logprobs
            ids = np.argpartition(-x, k, axis=1)[:, :k]
            vals = np.take_along_axis(x, ids, axis=1)
            order = np.argsort(-vals, axis=1, kind="stable")
            ids, vals = np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)
            tops = [[(int(i), float(v - lse[j])) for i, v in zip(ids[j], vals[j], strict=True)]
                    for j in rows]
        return tokens, logprobs, tops

    def _steps(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               adapters: Sequence[str | os.PathLike]) -> Iterator[tuple[list[_Row], list[int]]]:
        """Decode `prompts` together; after each step yield (rows, indices of rows that got a
        token this step). Frees its sequences and adapters however it ends."""
        params.validate()
        for p in prompts:
            self._check(p, params)
        keys = tuple(self._acquire(list(adapters)))
        try:
            seqs = self._reserve(len(prompts))
        except Exception:
            self._release(keys)
            raise
        rows = [_Row(list(p), s) for p, s in zip(prompts, seqs, strict=True)]
        rng = np.random.default_rng(params.seed)
        try:
            for seq in seqs:
                self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
            entries = [(t, i, r.seq, i == len(r.prompt) - 1)
                       for r in rows for i, t in enumerate(r.prompt)]
            logits = self._decode(entries, keys)
            for r in rows:
                r.pos = len(r.prompt)
            live = list(range(len(rows)))
            for _ in range(params.max_tokens):
                stepped = []
                tokens, logprobs, tops = self._pick(logits, params, rng)
                for j, idx in enumerate(live):
                    r = rows[idx]
                    token = int(tokens[j])
                    if token in self._stops and not params.ignore_eos:
                        r.alive, r.reason = False, "stop"
                        continue
                    r.tokens.append(token)
                    r.logprobs.append(float(logprobs[j]))
                    if tops is not None:
                        r.tops.append(tops[j])
                    stepped.append(idx)
                    if params.stop:
                        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
                        cut = first_stop(text, params.stop)
                        if cut is not None:
                            r.text, r.reason, r.alive = text[:cut], "stop", False
                yield rows, stepped
                live = [i for i in live if rows[i].alive]
                if not live or len(rows[live[0]].tokens) >= params.max_tokens:
                    break
                logits = self._decode([(rows[i].tokens[-1], rows[i].pos, rows[i].seq, True)
                                       for i in live], keys)
                for i in live:
                    rows[i].pos += 1
        finally:
            for seq in seqs:
                self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._free_seqs.extend(seqs)
            self._release(keys)

    def _completion(self, r: _Row, params: SamplingParams) -> Completion:
        text = r.text if r.text is not None else self.tokenizer.decode(r.tokens,
                                                                       skip_special_tokens=True)
        return Completion(prompt_ids=list(r.prompt), token_ids=r.tokens, logprobs=r.logprobs,
                          text=text, finish_reason=r.reason,
                          top_logprobs=r.tops if params.top_logprobs else None)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 adapters: Sequence[str | os.PathLike] = ()) -> list[Completion]:
        """Complete every prompt with `adapters` applied: up to max_batch prompts share each
        llama_decode call (more are decoded in turn, max_batch at a time)."""
        out: list[Completion | None] = [None] * len(prompts)
        for group in self._groups(len(prompts)):
            rows: list[_Row] = []
            for step in self._steps([prompts[i] for i in group], params, adapters):
                rows = step[0]
            for i, r in zip(group, rows, strict=True):
                out[i] = self._completion(r, params)
        return out  # type: ignore[return-value]

    def stream(self, prompt: Sequence[int], params: SamplingParams,
               adapters: Sequence[str | os.PathLike] = ()) -> Iterator[str | Completion]:
        """Yield text pieces as they are decoded, then the final Completion."""
        sent = ""
        r = None
        steps = self._steps([prompt], params, adapters)
        try:
            for rows, _ in steps:
                r = rows[0]
                text = r.text if r.text is not None else self.tokenizer.decode(
                    r.tokens, skip_special_tokens=True)
                # Hold back a piece that ends inside a multi-byte character.
                if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text
        finally:
            steps.close()  # a stream given up early frees its sequence and adapters now
        if r is None:  # not reached: _steps yields at least once
            raise RuntimeError("no step was decoded")
        final = self._completion(r, params)
        if final.text.startswith(sent) and len(final.text) > len(sent):
            yield final.text[len(sent):]
        yield final

    def close(self) -> None:
        """Free llama.cpp's context, adapters and model (also done at interpreter exit)."""
        lib = getattr(self, "_lib", None)
        if lib is None or not getattr(self, "_ctx", None):
            return
        lib.llama_batch_free(self._batch)
        lib.llama_free(self._ctx)
        self._ctx = None
        for loaded in self._loaded.values():
            lib.llama_adapter_lora_free(loaded.handle)
        self._loaded.clear()
        lib.llama_model_free(self._model)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
