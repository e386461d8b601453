"""LoRA adapter files and their use on a loaded model.

An adapter directory is PEFT's own format (adapter_config.json + adapter_model.safetensors,
loadable by other tools such as vLLM) plus `checksum.sha256` over both files. Directories are
written atomically (temporary directory, fsync, rename) and verified on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from onthejob.model.load import LoadedModel

CHECKSUM_FILE = "checksum.sha256"
_FILES = ("adapter_config.json", "adapter_model.safetensors")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Named choices of the layers an adapter touches (`--lora-modules`).
LORA_MODULES = {"all": LORA_TARGETS, "attention": LORA_TARGETS[:4], "mlp": LORA_TARGETS[4:]}


class AdapterError(RuntimeError):
    """An adapter directory is missing, incomplete or corrupt."""


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: Sequence[str] = field(default_factory=lambda: LORA_TARGETS)

    def to_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets), bias="none", task_type="CAUSAL_LM")


def checksum(path: str | os.PathLike) -> str:
    """sha256 over the adapter's config and weights, in a fixed order."""
    digest = hashlib.sha256()
    for name in _FILES:
        file = Path(path) / name
        if not file.exists():
            raise AdapterError(f"{file} is missing: the adapter at {path} is incomplete")
        digest.update(name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | os.PathLike) -> str:
    """Return the adapter's checksum, or raise AdapterError if it does not match the file."""
    path = Path(path)
    stored_file = path / CHECKSUM_FILE
    if not stored_file.exists():
        raise AdapterError(f"{path} has no {CHECKSUM_FILE}: not an onthejob adapter, or cut short")
    stored = stored_file.read_text().strip()
    actual = checksum(path)
    if actual != stored:
        raise AdapterError(
            f"adapter {path} is corrupt (checksum {actual[:12]} != recorded {stored[:12]}); "
            "roll back to the previous version with `onthejob adapters rollback`"
        )
    return actual


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(peft_model: PeftModel, adapter_name: str, target: str | os.PathLike,
         meta: dict | None = None) -> str:
    """Write one adapter of `peft_model` to `target` atomically; return its checksum."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
        # PEFT writes a non-default adapter into a subfolder named after it.
        nested = tmp / adapter_name
        if nested.is_dir():
            for item in nested.iterdir():
                os.replace(item, tmp / item.name)
            nested.rmdir()
        digest = checksum(tmp)
        (tmp / CHECKSUM_FILE).write_text(digest + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2, default=str))
        for item in tmp.iterdir():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if target.exists():
            raise AdapterError(f"{target} exists already; adapter versions are never overwritten")
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return digest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _key(path: str | os.PathLike) -> str:
    return "a" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def attach(lm: LoadedModel, name: str, spec: LoraSpec | None = None,
           init_from: str | os.PathLike | None = None, trainable: bool = True) -> None:
    """Add adapter `name` to lm.model (wrapping it in PEFT on first use): fresh from `spec`,
    or a copy of the adapter at `init_from`. Only adapter weights are left trainable."""
    if init_from is not None:
        verify(init_from)
        if isinstance(lm.model, PeftModel):
            lm.model.load_adapter(str(init_from), adapter_name=name, is_trainable=trainable)
        else:
            lm.model = PeftModel.from_pretrained(lm.model, str(init_from), adapter_name=name,
                                                 is_trainable=trainable)
    else:
        cfg = (spec or LoraSpec()).to_config()
        if isinstance(lm.model, PeftModel):
            lm.model.add_adapter(name, cfg)
        else:
            lm.model = get_peft_model(lm.model, cfg, adapter_name=name)
    for pname, param in lm.model.named_parameters():
        param.requires_grad = trainable and f".{name}." in pname and "lora_" in pname


def detach(lm: LoadedModel, name: str) -> None:
    """Remove adapter `name`; removing the last one returns lm.model to the plain base."""
    if not (isinstance(lm.model, PeftModel) and name in lm.model.peft_config):
        return
    others = [n for n in lm.model.peft_config if n != name]
    if not others:
        lm.model = lm.model.unload()
        return
    if name in lm.model.active_adapters:
        lm.model.base_model.set_adapter(others[0])
    lm.model.delete_adapter(name)


def activate(lm: LoadedModel, names: Sequence[str] | None, trainable: str | None = None) -> None:
    """Make exactly `names` the active adapters (stacked); None or [] means the base model.
    Only the adapter named `trainable` (if any) keeps requires_grad."""
    if not isinstance(lm.model, PeftModel):
        if names:
            raise AdapterError(f"adapters {list(names)} are not loaded")
        return
    lora = lm.model.base_model
    if not names:
        lora.disable_adapter_layers()
    else:
        lora.enable_adapter_layers()
        lora.set_adapter(list(names) if len(names) > 1 else names[0])
    # set_adapter marks active adapters trainable; only `trainable` may be.
    for pname, param in lm.model.named_parameters():
        param.requires_grad = bool(trainable) and "lora_" in pname and f".{trainable}." in pname


def random_lora(lm: LoadedModel, name: str, spec: LoraSpec | None = None, seed: int = 0,
                scale: float = 0.02) -> None:
    """Attach a frozen adapter `name` whose B matrices are seeded normal noise times `scale`
    (so it changes the outputs, unlike a fresh LoRA), and make it the active one: what
    benchmarks and tests use to stand for a trained tenant adapter."""
    import torch

    attach(lm, name, spec=spec or LoraSpec(), trainable=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in lm.model.named_parameters():
            if "lora_B" in pname and f".{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    activate(lm, [name])


def use_adapter(lm: LoadedModel, paths: str | os.PathLike | Sequence[str | os.PathLike] | None,
                max_loaded: int = 8) -> None:
    """Serve with the adapters at `paths` stacked (shared first, then the tenant's), or the base
    model when None. Loads and verifies each adapter once, then switches in microseconds."""
    if paths is None or (not isinstance(paths, (str, os.PathLike)) and not paths):
        activate(lm, None)
        return
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    names = []
    for path in paths:
        name = _key(path)
        loaded = isinstance(lm.model, PeftModel) and name in lm.model.peft_config
        if not loaded:
            attach(lm, name, init_from=path, trainable=False)
        names.append(name)
    activate(lm, names)
    _evict(lm, keep=set(names), max_loaded=max_loaded)


def _evict(lm: LoadedModel, keep: set[str], max_loaded: int) -> None:
    loaded = [n for n in lm.model.peft_config if n.startswith("a") and n not in keep]
    for name in loaded[: max(0, len(loaded) + len(keep) - max_loaded)]:
        lm.model.delete_adapter(name)
