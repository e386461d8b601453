"""PEFT LoRA adapter directories with the default model's shapes, written without loading any
model: random A and B (or B = 0), in PEFT's own format with onthejob's checksum."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from onthejob.model.adapters import CHECKSUM_FILE, checksum

# SmolLM2-135M: hidden 576, 9 query heads and 3 key/value heads of 64, MLP 1536, 30 layers.
SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
          "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
          "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
LAYERS = 30


def fake_adapter(path: str | Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                 b_std: float = 0.02, layers: int = LAYERS, extra_config: dict | None = None) -> Path:
    """Write an adapter directory of the default model's shapes; b_std=0 makes B zero (an
    adapter that changes nothing)."""
    path = Path(path)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) / inp ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * b_std
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none",
           "target_modules": sorted({m.split(".")[1] for m in SHAPES}), "use_rslora": False,
           "task_type": "CAUSAL_LM", **(extra_config or {})}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    (path / CHECKSUM_FILE).write_text(checksum(path) + "\n")
    return path


def peft_tensors(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(str(Path(path) / "adapter_model.safetensors")).items()}


def _interleave_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order, by its definition: HF row h*d + half*(d/2) + i is GGUF row
    h*d + 2*i + half (written out here apart from onthejob's own permute_rows)."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for i in range(d // 2):
                out[h * d + 2 * i + half] = w[h * d + half * (d // 2) + i]
    return out


def write_gguf(lm, path: str | Path, tokenizer_from: str | Path) -> Path:
    """The (tiny, random) torch Llama `lm` as a float32 GGUF llama.cpp runs, its tokenizer
    copied from the GGUF `tokenizer_from` (the same vocabulary)."""
    import gguf

    cfg = lm.model.config
    src = gguf.GGUFReader(tokenizer_from)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None)
                               or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    f = src.fields
    w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    w.add_token_list(f["tokenizer.ggml.tokens"].contents())
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(f["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(f["tokenizer.ggml.bos_token_id"].contents())
    w.add_eos_token_id(f["tokenizer.ggml.eos_token_id"].contents())
    w.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in lm.model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(cfg.num_hidden_layers):
        for hf, g in names.items():
            t = sd[f"model.layers.{layer}.{hf}.weight"]
            if g == "attn_q":
                t = _interleave_rotary(t, cfg.num_attention_heads)
            elif g == "attn_k":
                t = _interleave_rotary(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
