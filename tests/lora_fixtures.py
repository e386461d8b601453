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
