"""The fast forward pass for Llama-family models, used by the one generation path.

Why it exists (profiled with py-spy on the default model, batch 1, one thread): the
transformers forward spends ~30% of a decode step outside the matrix products (module
calls, cache bookkeeping, mask building, 420 small LoRA matmuls a step), and the prefill
built vocabulary logits for every prompt position. Here a step is the plain arithmetic:

- weights are gathered once per adapter state: each projection's base weight with the
  active LoRA deltas merged in (W + scale * B @ A), q/k/v and gate/up concatenated into
  one matrix each; the set is cached and rebuilt only when a weight changes (tensor
  version counters see every optimizer step), so a trainable student samples with its
  current weights;
- the KV cache is allocated once per call at prompt width + max_tokens and written in place;
- only the last position's logits are computed.

Only vanilla LoRA on the Linear projections is merged; anything else (another architecture,
DoRA, LoRA on the embeddings) is reported by `unsupported()` and generation falls back to
the transformers forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from onthejob.model.load import LoadedModel

_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
         ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


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
        if isinstance(module, LoraLayer) and not name.endswith(tuple(p for _, p in _PROJ)):
            if not module.disable_adapters and any(a in module.lora_A for a in module.active_adapters):
                return f"a LoRA adapter on {name} (only the attention and MLP projections merge)"
        if isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged:
            for a in module.active_adapters:
                if a in module.lora_variant:
                    return f"adapter {a} is not vanilla LoRA ({type(module.lora_variant[a]).__name__})"
                if a in module.lora_B and module.lora_B[a].bias is not None:
                    return f"adapter {a} has a LoRA bias"
    return None


def _effective(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of one projection as its forward computes it now: the base weight plus
    every active LoRA delta (PEFT's own get_delta_weight, which applies the scaling)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return module.weight, module.bias
    base = module.get_base_layer()
    weight = base.weight
    if not module.disable_adapters and not module.merged:
        active = [a for a in module.active_adapters if a in module.lora_A]
        if active:
            weight = weight.detach().clone()
            for a in active:
                weight += module.get_delta_weight(a).to(weight.dtype)
    return weight, base.bias


def state_key(lm: LoadedModel, dtype: torch.dtype) -> tuple:
    """Identity and version of every tensor the merged weights depend on (cheap to build)."""
    model = _inner(lm)
    parts: list = [dtype, model.model.embed_tokens.weight, model.model.embed_tokens.weight._version,
                   model.lm_head.weight, model.lm_head.weight._version]
    for layer in model.model.layers:
        for group, proj in _PROJ:
            parts += _key_only(getattr(getattr(layer, group), proj))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            parts += [norm.weight, norm.weight._version]
    parts += [model.model.norm.weight, model.model.norm.weight._version]
    return tuple(parts)


def _key_only(module: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return [module.weight, module.weight._version]
    base = module.get_base_layer()
    key: list = [base.weight, base.weight._version]
    if not module.disable_adapters and not module.merged:
        for a in module.active_adapters:
            if a in module.lora_A:
                a_w, b_w = module.lora_A[a].weight, module.lora_B[a].weight
                key += [a_w, a_w._version, b_w, b_w._version, module.scaling[a]]
    return key


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(a, b, strict=True))


class _Proj:
    """One projection's weight, prepacked for oneDNN where that works (measured on this CPU:
    a float32 decode step's matrix products 2.2x faster at batch 8 than torch's default
    kernel, see docs/results/generate.md), else the plain tensor for F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 pack: bool) -> None:
        weight = weight.detach().to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.dtype = dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8) if pack else None
        self.weight = None if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


_PACKING: dict[torch.dtype, bool] = {}


def packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN weight prepacking is available in this torch build and computes the same
    products as F.linear (checked once per dtype)."""
    if dtype not in _PACKING:
        try:
            gen = torch.Generator().manual_seed(0)
            w = torch.randn(96, 64, generator=gen).to(dtype)
            x = torch.randn(5, 64, generator=gen).to(dtype)
            proj = _Proj(w, None, dtype, pack=True)
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            _PACKING[dtype] = torch.allclose(proj(x).float(), F.linear(x, w).float(), atol=tol,
                                             rtol=tol)
        except (RuntimeError, AttributeError, NotImplementedError):
            _PACKING[dtype] = False
    return _PACKING[dtype]


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: _Proj
    o: _Proj
    norm2: torch.Tensor
    gate_up: _Proj
    down: _Proj


def _cat_bias(biases: list[torch.Tensor | None], sizes: list[int], like: torch.Tensor
              ) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(n, dtype=like.dtype)
                      for b, n in zip(biases, sizes, strict=True)])


class FastDecoder:
    """The model's weights in the form one decode step wants, for one adapter state."""

    def __init__(self, lm: LoadedModel, dtype: torch.dtype = torch.float32,
                 pack: bool | None = None) -> None:
        model = _inner(lm)
        pack = packing_works(dtype) if pack is None else pack
        cfg = model.config
        self.dtype = dtype
        self.key = state_key(lm, dtype)
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.act = ACT2FN[cfg.hidden_act]
        self.rotary = model.model.rotary_emb
        self.embed = model.model.embed_tokens.weight.detach()
        self.lm_head = _Proj(model.lm_head.weight, None, dtype, pack)
        self.norm = model.model.norm.weight.detach()
        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                w = {}
                for group, proj in _PROJ:
                    weight, bias = _effective(getattr(getattr(layer, group), proj))
                    w[proj] = (weight.detach(), None if bias is None else bias.detach())
                qkv = [w[p] for p in ("q_proj", "k_proj", "v_proj")]
                gu = [w[p] for p in ("gate_proj", "up_proj")]
                self.layers.append(_Layer(
                    norm1=layer.input_layernorm.weight.detach(),
                    qkv=_Proj(torch.cat([x for x, _ in qkv]),
                              _cat_bias([b for _, b in qkv], [x.shape[0] for x, _ in qkv],
                                        qkv[0][0]), dtype, pack),
                    o=_Proj(*w["o_proj"], dtype, pack),
                    norm2=layer.post_attention_layernorm.weight.detach(),
                    gate_up=_Proj(torch.cat([x for x, _ in gu]),
                                  _cat_bias([b for _, b in gu], [x.shape[0] for x, _ in gu],
                                            gu[0][0]), dtype, pack),
                    down=_Proj(*w["down_proj"], dtype, pack),
                ))
        self.intermediate = w["gate_proj"][0].shape[0]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for (batch, time) positions, shaped to broadcast over heads."""
        cos, sin = self.rotary(self.embed[:1].to(torch.float32), positions)
        return cos[:, None], sin[:, None]

    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.kv_heads, length, self.head_dim)
        return [(torch.zeros(shape, dtype=torch.float32), torch.zeros(shape, dtype=torch.float32))
                for _ in self.layers]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: list,
                start: int, mask: torch.Tensor) -> torch.Tensor:
        """Run `ids` (batch, time) written at cache columns start..start+time; `mask` (batch, 1,
        time, start+time) says which cached columns each query sees. Returns the last
        position's logits (batch, vocab) in float32."""
        b, t = ids.shape
        end = start + t
        x = F.embedding(ids, self.embed)
        cos, sin = self.rope(positions)
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        half = d // 2
        for layer, (k_cache, v_cache) in zip(self.layers, cache, strict=True):
            y = _rms(x, layer.norm1, self.eps)
            qkv = layer.qkv(y).float()
            qkv = qkv.view(b, t, h + 2 * kvh, d).transpose(1, 2)
            qk = qkv[:, : h + kvh]
            rot = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rot * sin
            k_cache[:, :, start:end] = qk[:, h:]
            v_cache[:, :, start:end] = qkv[:, h + kvh:]
            att = F.scaled_dot_product_attention(qk[:, :h], k_cache[:, :, :end], v_cache[:, :, :end],
                                                 attn_mask=mask, enable_gqa=kvh != h)
            att = att.transpose(1, 2).reshape(b, t, h * d)
            x = x + layer.o(att).float()
            y = _rms(x, layer.norm2, self.eps)
            gu = layer.gate_up(y)
            gate, up = gu[..., : self.intermediate], gu[..., self.intermediate:]
            x = x + layer.down(self.act(gate) * up).float()
        last = _rms(x[:, -1], self.norm, self.eps)
        return self.lm_head(last).float()


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The same operations, in the same order, as LlamaRMSNorm (float32 throughout).
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def decoder_for(lm: LoadedModel, dtype: torch.dtype = torch.float32) -> FastDecoder | None:
    """The cached FastDecoder for lm's current weights and adapters (rebuilt when any of them
    changed), or None when the model is not one it supports."""
    if unsupported(lm) is not None:
        return None
    cached = lm.decoder_cache
    if cached is not None and _same(cached.key, state_key(lm, dtype)):
        return cached
    lm.decoder_cache = None  # free the old weights before building the new ones
    lm.decoder_cache = FastDecoder(lm, dtype)
    return lm.decoder_cache
