"""The fast forward pass for Llama-family models, used by the one generation path.

Why it exists (profiled with py-spy on the default model with a LoRA adapter, one thread):
the transformers forward spent ~30% of a decode step outside the matrix products (module
calls, cache bookkeeping, mask building, 420 small LoRA matmuls a step) and the prefill
built vocabulary logits for every prompt position. Here a step is the plain arithmetic:

- weights are gathered once per adapter state: each projection's base weight with the
  frozen LoRA deltas merged in (W + scale * B @ A), q/k/v and gate/up concatenated into one
  matrix each, prepacked for oneDNN where this torch has it (2-3x faster products at batch
  8 and 32 on this CPU, docs/results/generate-profile.md);
- an adapter whose weights change after it was merged (a student in training) becomes
  *live*: applied unmerged at every step from its current values, as PEFT computes it, so
  an optimizer step costs no rebuild; projections made of unchanged tensors are reused
  when the adapter state changes;
- with `dtype` torch.int8 (`--precision int8`) the merged weights are quantized to int8
  with one scale per output channel and multiplied by bf16 activations (weight-only int8):
  a decode step then reads a quarter of float32's bytes. Products of more rows (prefill, big
  batches) go through the same quantized weights held dequantized, in bf16 where bf16 is
  native, else float32, where those products beat the int8 kernel (int8_plan;
  docs/RESULTS.md, "Weight-only int8");
- with lm.decode_compiled (`--compile`) each layer of a one-token step with no live adapter
  runs through torch.compile (inductor; dynamic shapes, so batch size and cache length do not recompile):
  the norms, rope, casts and residuals between the products become a few fused kernels
  instead of ~40 operations a layer, each paying the interpreter and dispatcher. It costs
  minutes of compiling on first use (inductor caches it on disk for later processes);
- tensor version counters see every in-place update, so the cached state is never stale;
- the KV cache is allocated once per call and written in place; grouped-query attention
  runs on the cache as it is (no repeated key/value copies); only the last position's
  logits are computed.

Only vanilla LoRA on the Linear projections is supported; anything else (another
architecture, DoRA, LoRA on the embeddings) is reported by `unsupported()` and generation
falls back to the transformers forward.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from onthejob.model.load import LoadedModel
from onthejob.model.threads import run_in_thread

_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
         ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
# lm.decode_dtype for weight-only int8: int8 weights, bf16 activations.
INT8 = torch.int8
# Up to `rows` rows a product uses the int8 kernel; more use a "wide" copy of the same
# quantized weights, in bf16 where bf16 is native, else float32. Measured on the default
# model's shapes, 2 threads, ms for the linear layers of one model pass:
# - Xeon with avx512_bf16: int8 14.9 vs bf16 24.8 at 1 row, 46.4 vs 32.9 at 8 rows;
# - AMD EPYC, AVX2 only: int8 6.0 / 35.3 / 64.5 / 127.6 at 1 / 8 / 16 / 32 rows, float32
#   38.9 / 81.2 / 129.6 / 132.8 (emulated bf16 422.6 at 32 rows); a whole batch of 32
#   decoded slower with int8 kernels than with float32 (96.8 vs 116.2 tokens/s).
INT8_ROWS_NATIVE_BF16 = 4
INT8_ROWS_EMULATED_BF16 = 16
_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
          "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


def _inner(lm: LoadedModel) -> torch.nn.Module:
    """The causal LM under any PEFT wrapping."""
    model = lm.model
    if hasattr(model, "peft_config"):
        model = model.base_model.model
    return model


def unsupported(lm: LoadedModel) -> str | None:
    """Why the fast decoder cannot run this model as it is now, or None when it can."""
    model = _inner(lm)
    cfg = model.config
    if cfg.model_type != "llama" or type(model).__name__ != "LlamaForCausalLM":
        return f"architecture {cfg.model_type} ({type(model).__name__}) is not Llama"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if active and not name.endswith(tuple(p for _, p in _PROJ)):
            return f"a LoRA adapter on {name} (only the attention and MLP projections merge)"
        for a in active:
            if a in module.lora_variant:
                return f"adapter {a} is not vanilla LoRA ({type(module.lora_variant[a]).__name__})"
            if module.lora_B[a].bias is not None:
                return f"adapter {a} has a LoRA bias"
    return None


def _adapters(module: torch.nn.Module, live_ids: dict) -> tuple[list[str], list[str]]:
    """The active LoRA adapters of one projection: (frozen ones, merged into the weight;
    live ones, applied unmerged at every step)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
        return [], []
    active = [a for a in module.active_adapters if a in module.lora_A]
    live = [a for a in active if id(module.lora_A[a].weight) in live_ids
            or id(module.lora_B[a].weight) in live_ids]
    return [a for a in active if a not in live], live


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _source(module: torch.nn.Module, live_ids: dict) -> tuple[list, list]:
    """Key parts of one projection: (what its merged weight is made of, its live adapters)."""
    base = _base(module)
    source: list = [base.weight, base.weight._version]
    frozen, live = _adapters(module, live_ids)
    for a in frozen:
        a_w, b_w = module.lora_A[a].weight, module.lora_B[a].weight
        source += ["frozen", a_w, a_w._version, b_w, b_w._version, module.scaling[a]]
    return source, [p for a in live for p in ("live", module.lora_A[a].weight,
                                               module.lora_B[a].weight, module.scaling[a])]


def _merged(module: torch.nn.Module, live_ids: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base weight plus every frozen LoRA delta (PEFT's get_delta_weight, with scaling)."""
    base = _base(module)
    weight = base.weight.detach()
    frozen, _ = _adapters(module, live_ids)
    if frozen:
        weight = weight.clone()
        for a in frozen:
            weight += module.get_delta_weight(a).to(weight.dtype)
    return weight, None if base.bias is None else base.bias.detach()


def state_key(lm: LoadedModel, dtype: torch.dtype, live_ids: dict) -> tuple:
    """Identity and version of every tensor the decoder's weights depend on (cheap to build).
    Live adapters enter by identity only: their values are read at every step."""
    model = _inner(lm)
    emb, head, norm = model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight
    parts: list = [dtype, emb, emb._version, head, head._version, norm, norm._version]
    for layer in model.model.layers:
        for group, proj in _PROJ:
            source, live = _source(getattr(getattr(layer, group), proj), live_ids)
            parts += source + live
        for n in (layer.input_layernorm, layer.post_attention_layernorm):
            parts += [n.weight, n.weight._version]
    return tuple(parts)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(a, b, strict=True))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, bf16 scales) with weight ~= q * scale.
    The scales are rounded to bf16 first (the kernel takes them so), then the weight is
    rounded against the rounded scales, so q * scale is what every kernel computes with."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 arithmetic is native on `device` (CUDA with bf16, or a CPU with AVX512-BF16
    or AMX); elsewhere it is emulated: it still halves the bytes a product reads, but its
    arithmetic is slower than float32's (a 237x576 by 576x1536 matmul took 104 ms in bf16
    against 14 ms in float32 on an AVX2-only AMD EPYC, one thread). Training's bf16 autocast
    and the decoder's int8 plan both follow it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def int8_plan(device: torch.device) -> tuple[int, torch.dtype]:
    """For weight-only int8 on `device`: up to how many rows the int8 kernel runs, and the
    dtype of the dequantized copy that takes more rows (see INT8_ROWS_NATIVE_BF16)."""
    if native_bf16(device):
        return INT8_ROWS_NATIVE_BF16, torch.bfloat16
    return INT8_ROWS_EMULATED_BF16, torch.float32


@torch.library.custom_op("onthejob::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    """x (rows, in) times a oneDNN-prepacked weight, plus bias. An opaque operation for
    torch.compile, whose inductor would otherwise lower it expecting the weight as a frozen
    constant."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
      out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


class _Proj:
    """One (fused) projection: its merged weight, prepacked for oneDNN where that works, else
    the plain tensor for F.linear; plus the live adapters added to its output columns. With
    dtype INT8 the weight is quantized (`q8`, multiplied with bf16 activations up to
    `int8_rows` rows) and `weight`/`packed` hold its dequantized copy in the wide dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 pack: bool, source: list) -> None:
        self.q8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int8_rows = 0
        if dtype == INT8:
            self.q8 = quantize_int8(weight)
            self.int8_rows, dtype = int8_plan(weight.device)
            weight = dequantize_int8(*self.q8)
        weight = weight.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)
        self.dtype, self.source = dtype, source
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8) if pack else None
        self.weight = None if pack else weight
        self.live: list = []  # (A, B, scaling, first, last): out[..., first:last] += ...

    def with_live(self, live: list) -> _Proj:
        twin = copy.copy(self)
        twin.live = live
        return twin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.q8 is not None and x.numel() <= self.int8_rows * x.shape[-1]:
            small = x.to(torch.bfloat16).reshape(-1, x.shape[-1])
            out = torch.ops.aten._weight_int8pack_mm(small, *self.q8)
            if self.bias is not None:
                out = out + self.bias
            out = out.view(*x.shape[:-1], out.shape[-1])
        elif self.packed is None:
            out = F.linear(x.to(self.dtype), self.weight, self.bias)
        else:
            flat = x.to(self.dtype).reshape(-1, x.shape[-1])
            if torch.compiler.is_compiling():
                out = packed_linear(flat, self.packed, self.bias, self.out_features)
            else:  # the same call without the custom operator's dispatch (~10 us)
                out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none",
                                                         [], "")
            out = out.view(*x.shape[:-1], out.shape[-1])
        for a, b, scaling, first, last in self.live:
            # as PEFT computes it: lora_B(lora_A(x)) * scaling, in the adapter's dtype
            delta = F.linear(F.linear(x.to(a.dtype), a), b) * scaling
            out[..., first:last] += delta.to(out.dtype)
        return out


_PACKING: dict[torch.dtype, bool] = {}


@functools.cache
def int8_works() -> bool:
    """Whether this torch has the weight-only int8 kernel and it computes what F.linear does
    with the dequantized weight (checked once, in a thread that ends: the kernel starts an
    OpenMP team, which in the main thread would slow the engine thread; model/threads.py)."""
    return run_in_thread(_check_int8, "onthejob-int8-check")


def _check_int8() -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(96, 64, generator=gen)
        x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
        proj = _Proj(w, None, INT8, False, [])
        want = F.linear(x.float(), dequantize_int8(*proj.q8))
        return torch.allclose(proj(x).float(), want, atol=5e-2, rtol=5e-2)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN weight prepacking is available in this torch build and computes the same
    products as F.linear (checked once per dtype, in a thread that ends, as int8_works)."""
    if dtype not in _PACKING:
        _PACKING[dtype] = run_in_thread(lambda: _check_packing(dtype), "onthejob-pack-check")
    return _PACKING[dtype]


def _check_packing(dtype: torch.dtype) -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(96, 64, generator=gen).to(dtype)
        x = torch.randn(5, 64, generator=gen).to(dtype)
        proj = _Proj(w, None, dtype, True, [])
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return torch.allclose(proj(x).float(), F.linear(x, w).float(), atol=tol, rtol=tol)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: _Proj
    o: _Proj
    norm2: torch.Tensor
    gate_up: _Proj
    down: _Proj


class FastDecoder:
    """The model's weights in the form one decode step wants, for one adapter state."""

    def __init__(self, lm: LoadedModel, dtype: torch.dtype = torch.float32,
                 pack: bool | None = None, live_ids: dict | None = None,
                 previous: FastDecoder | None = None) -> None:
        model = _inner(lm)
        cfg = model.config
        self.dtype = dtype
        self.compiled = lm.decode_compiled
        on_cpu = model.lm_head.weight.device.type == "cpu"
        if dtype == INT8 and not int8_works():
            raise ValueError("weight-only int8 needs torch's _weight_int8pack_mm kernel, which "
                             "this torch build lacks: use --precision float32 or bfloat16")
        compute = int8_plan(model.lm_head.weight.device)[1] if dtype == INT8 else dtype
        self.pack = (on_cpu and packing_works(compute)) if pack is None else pack
        self.live_ids = dict(live_ids or {})  # id -> tensor (held, so the id stays its own)
        self.key = state_key(lm, dtype, self.live_ids)
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.act = ACT2FN[cfg.hidden_act]
        self.rotary = model.model.rotary_emb
        self.embed = model.model.embed_tokens.weight.detach()
        self.norm = model.model.norm.weight.detach()
        reuse = previous is not None and previous.dtype == dtype and previous.pack == self.pack
        head = model.lm_head.weight
        if reuse and _same(tuple(previous.lm_head.source), (head, head._version)):
            self.lm_head = previous.lm_head
        else:
            self.lm_head = _Proj(head.detach(), None, dtype, self.pack, [head, head._version])
        self.layers = []
        with torch.no_grad():
            for index, layer in enumerate(model.model.layers):
                modules = {proj: getattr(getattr(layer, group), proj) for group, proj in _PROJ}
                fused = {name: self._proj([modules[p] for p in parts],
                                          getattr(previous.layers[index], name) if reuse else None)
                         for name, parts in _FUSED.items()}
                self.layers.append(_Layer(norm1=layer.input_layernorm.weight.detach(),
                                          norm2=layer.post_attention_layernorm.weight.detach(),
                                          **fused))
        self.intermediate = _base(modules["gate_proj"]).out_features

    def _proj(self, modules: list, reuse: _Proj | None) -> _Proj:
        """A fused projection; its merged weight is reused from `reuse` when made of the very
        same tensors at the same versions, else merged and packed anew."""
        source, live, first = [], [], 0
        for module in modules:
            part, _ = _source(module, self.live_ids)
            source += part
            last = first + _base(module).out_features
            _, names = _adapters(module, self.live_ids)
            live += [(module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a], first,
                      last) for a in names]
            first = last
        if reuse is not None and _same(tuple(reuse.source), tuple(source)):
            return reuse.with_live(live)
        pieces = [_merged(m, self.live_ids) for m in modules]
        weight = torch.cat([w for w, _ in pieces]) if len(pieces) > 1 else pieces[0][0]
        bias = None
        if any(b is not None for _, b in pieces):
            bias = torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                              for w, b in pieces])
        return _Proj(weight, bias, self.dtype, self.pack, source).with_live(live)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for (batch, time) positions, shaped to broadcast over heads."""
        cos, sin = self.rotary(self.embed[:1].to(torch.float32), positions)
        return cos[:, None], sin[:, None]

    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.kv_heads, length, self.head_dim)
        like = {"dtype": torch.float32, "device": self.embed.device}
        return [(torch.zeros(shape, **like), torch.zeros(shape, **like)) for _ in self.layers]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: list,
                start: int, mask: torch.Tensor) -> torch.Tensor:
        """Run `ids` (batch, time) written at cache columns start..start+time; `mask` (batch, 1,
        time, start+time) says which cached columns each query sees. Returns the last
        position's logits (batch, vocab) in float32. Each layer of a one-token step runs
        compiled (see `compiled_layer`) when self.compiled and no adapter is live."""
        b, t = ids.shape
        end = start + t
        x = F.embedding(ids, self.embed)
        cos, sin = self.rope(positions)
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        group, half = h // kvh, d // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2], value for value (negation is
        # exact): two operations a layer instead of four.
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        # Query heads grouped by the key/value head they share (head i uses kv head i // group,
        # as transformers' repeat_kv has it): (batch, kv heads, group * time, dim).
        if group > 1:
            mask = mask.repeat(1, 1, group, 1) if t > 1 else mask
        run = FastDecoder._layer
        if self.compiled and t == 1 and not self.live_ids:
            run = compiled_layer()
        for layer, (k_cache, v_cache) in zip(self.layers, cache, strict=True):
            x = run(self, layer, x, cos, sin, k_cache, v_cache, start, end, mask)
        last = _rms(x[:, -1], self.norm, self.eps)
        return self.lm_head(last).float()

    def _layer(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, end: int,
               mask: torch.Tensor) -> torch.Tensor:
        """One decoder layer on x (batch, time, hidden), its keys and values written at cache
        columns start..end; returns the new x."""
        b, t = x.shape[:2]
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        group, half = h // kvh, d // 2
        y = _rms(x, layer.norm1, self.eps)
        qkv = layer.qkv(y).float().view(b, t, h + 2 * kvh, d).transpose(1, 2)
        qk = qkv[:, : h + kvh]
        qk = qk * cos + qk.roll(half, -1) * sin
        k_cache[:, :, start:end] = qk[:, h:]
        v_cache[:, :, start:end] = qkv[:, h + kvh:]
        q = qk[:, :h].reshape(b, kvh, group * t, d)
        att = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end],
                                             attn_mask=mask)
        att = att.view(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)
        x = x + layer.o(att).float()
        y = _rms(x, layer.norm2, self.eps)
        gu = layer.gate_up(y)
        x = x + layer.down(self.act(gu[..., : self.intermediate])
                           * gu[..., self.intermediate:]).float()
        return x


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm (float32 throughout) as one fused operation instead of six; it computes the
    # same values as weight * (x * rsqrt(mean(x^2) + eps)) (the tests compare the two paths).
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


_COMPILED: list = []


def compiled_layer():
    """FastDecoder._layer through torch.compile, made once per process. One layer, not the
    whole step, is compiled: every layer runs the same code (30 times less to compile; the
    whole step's graph took over ten minutes on 2 cores). Its guards are on shapes and the
    decoder's structure, not on which weights it holds: every layer and every tenant's
    decoder of a precision share the compiled code (tests/test_decoder.py)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(FastDecoder._layer, dynamic=True))
    return _COMPILED[0]


def decoder_for(lm: LoadedModel, dtype: torch.dtype = torch.float32) -> FastDecoder | None:
    """The cached FastDecoder for lm's current weights and adapters (rebuilt when any of them
    changed, reusing what did not), or None when the model is not one it supports."""
    if unsupported(lm) is not None:
        return None
    cached = lm.decoder_cache
    live = cached.live_ids if cached is not None else {}
    key = state_key(lm, dtype, live)
    if cached is not None and _same(cached.key, key):
        cached.compiled = lm.decode_compiled
        return cached
    if cached is not None:  # adapters merged before whose weights have moved on become live
        live = {**live, **_moved(cached.key, key)}
    lm.decoder_cache = FastDecoder(lm, dtype, live_ids=live, previous=cached)
    return lm.decoder_cache


def _moved(old: tuple, new: tuple) -> dict:
    """LoRA weights merged in the `old` key whose version differs in the `new` one."""
    def frozen(key: tuple) -> dict:
        found = {}
        for i, part in enumerate(key):
            if isinstance(part, str) and part == "frozen":
                for tensor, version in ((key[i + 1], key[i + 2]), (key[i + 3], key[i + 4])):
                    found[id(tensor)] = (tensor, version)
        return found
    before = frozen(old)
    return {i: t for i, (t, v) in frozen(new).items()
            if i in before and before[i][0] is t and before[i][1] != v}
