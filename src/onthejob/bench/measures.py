"""What the knowledge benchmark measures beside accuracy on the sessions' own questions.

Forgetting: in-context reading comprehension on articles never trained on (1000+ of the data
file), and general questions the base model answers right (shipped in data/general.json,
screened on the default model). Cost: peak memory of one phase, adapter bytes on disk, and
the bytes of the KV cache that keeping a session in context would cost instead.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from pathlib import Path

import torch

from onthejob.learn.evaluate import contains

READING_FIRST_ARTICLE = 1000  # ../shared/data/README.md: articles 1000+ are never trained on


def general_right(answers: Sequence[str], items: Sequence[dict]) -> list[bool]:
    """Whether each answer contains one of its item's accepted answers (normalized match)."""
    return [any(contains(a, g) for g in it["answers"]) for a, it in zip(answers, items, strict=True)]


def reading_prompt(item: dict) -> str:
    """In-context reading: the passage and its question in one user turn (as the gate asks)."""
    return f"{item['context']}\n\nQuestion: {item['question']}"


def reading_set(articles: Sequence[dict], n: int) -> list[dict]:
    """The first question of each of `n` articles from 1000 on: passage + question in context."""
    pool = articles[READING_FIRST_ARTICLE:READING_FIRST_ARTICLE + n]
    if len(pool) < n:
        raise ValueError(f"the data has {max(0, len(articles) - READING_FIRST_ARTICLE)} articles "
                         f"from {READING_FIRST_ARTICLE} on; {n} reading items asked for")
    return [{"title": a["title"], "context": a["context"], "question": a["questions"][0]["question"],
             "answer": a["questions"][0]["answer"]} for a in pool]


def kv_cache_bytes(model_config, tokens: int, dtype_bytes: int) -> int:
    """Bytes of the keys and values a decoder keeps for `tokens` tokens of context:
    layers x 2 (K and V) x kv_heads x head_dim x tokens x bytes per value."""
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return layers * 2 * kv_heads * head_dim * tokens * dtype_bytes


def adapter_bytes(path: str | os.PathLike) -> int:
    """Bytes of an adapter's weights file (what is kept instead of the context)."""
    return (Path(path) / "adapter_model.safetensors").stat().st_size


class PeakMemory:
    """Peak memory of one phase, in MB. On CUDA the allocator's peak; on Linux the process's
    peak RSS, reset at the start through /proc/self/clear_refs (so phases do not inherit an
    earlier, larger peak); elsewhere the process's lifetime peak RSS."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.peak_mb = float("nan")
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda max allocated"
        elif _reset_hwm():
            self.kind = "RSS high-water mark of the phase"
        else:
            self.kind = "process peak RSS"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.kind.startswith("RSS"):
            self.peak_mb = _vm_hwm_kb() / 1024
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _vm_hwm_kb() > 0
    except OSError:
        return False


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


