"""The one training loop every learning rule runs on (opsd, sft, notes, grpo).

A rule is an object with `prepare(trainer)` and `step(trainer, step) -> (loss, metrics)`;
the loop owns the adapter, the optimizer, gradient clipping, data parallelism under torchrun,
progress lines with rates and ETA, the anchor-KL drift check and resumable checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from onthejob import faults
from onthejob.model import LoadedModel
from onthejob.model.adapters import LoraSpec, activate, attach
from onthejob.model.decoder import native_bf16

log = logging.getLogger(__name__)
STUDENT = "student"
TEACHER = "teacher"


@dataclass
class TrainConfig:
    steps: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    lora: LoraSpec = field(default_factory=LoraSpec)
    log_every: int = 1
    # bf16 autocast for the training passes: None = where the hardware has bf16 arithmetic
    # (CUDA, or a CPU with AVX512-BF16/AMX: 2.4x faster fwd+bwd measured). On a CPU without
    # it (AVX2 only) bf16 is emulated and a step was ~30x slower, so it stays off there.
    bf16: bool | None = None
    # "adamw": every adapter weight moves about lr a step whatever its gradient's size (Adam
    # normalizes it away), so a short run moves the weights that do not matter as far as those
    # that do; "sgd" (momentum 0.9): each weight moves in proportion to its gradient.
    optimizer: str = "adamw"
    # The learning rate over the run: "constant" (lr every step) or "cosine" (a linear warmup
    # over the first WARMUP_SHARE of the steps, then a cosine decay to MIN_LR_SHARE of lr), so
    # that the last steps, which decide what the adapter keeps, are small.
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose one "
                             f"of {', '.join(LR_SCHEDULES)}")


OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
WARMUP_SHARE = 0.05
MIN_LR_SHARE = 0.1


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The share of the peak learning rate used at `step` (0-based) of `steps`."""
    if schedule == "constant" or steps <= 1:
        return 1.0
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Rule(Protocol):
    name: str

    def prepare(self, trainer: Trainer) -> None: ...

    def step(self, trainer: Trainer, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...


class Trainer:
    """Holds the model with its adapters and the views learning rules switch between:
    `teacher()` (frozen: parent adapters or the base), `student()` (trainable) and `base()`."""

    def __init__(self, lm: LoadedModel, cfg: TrainConfig, parent: str | os.PathLike | None = None,
                 stack_below: Sequence[str | os.PathLike] = ()):
        self.lm, self.cfg = lm, cfg
        self.bf16 = native_bf16(lm.device) if cfg.bf16 is None else cfg.bf16
        self.rng = random.Random(cfg.seed + rank())
        torch.manual_seed(cfg.seed)
        # Adapters stacked below (the shared adapter) stay frozen in every view but the base.
        self.frozen_below: list[str] = []
        for i, path in enumerate(stack_below):
            attach(lm, f"below{i}", init_from=path, trainable=False)
            self.frozen_below.append(f"below{i}")
        self.teacher_names = list(self.frozen_below)
        if parent is not None:
            attach(lm, TEACHER, init_from=parent, trainable=False)
            self.teacher_names.append(TEACHER)
        # The student starts as a copy of its parent, so a new version refines the old one.
        attach(lm, STUDENT, spec=cfg.lora, init_from=parent, trainable=True)
        self.student()
        self.params = [p for p in lm.model.parameters() if p.requires_grad]
        if not self.params:
            raise RuntimeError("no trainable adapter parameters")
        if world() > 1:  # every rank starts from rank 0's adapter
            for p in self.params:
                dist.broadcast(p.data, src=0)
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=0.9,
                                             weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.history: list[dict[str, float]] = []
        # Told of every progress line of a long preparation phase (e.g. the teacher's answers):
        # consolidation keeps it in the run's row, so `onthejob runs show` sees it live.
        self.observer: Callable[[dict], None] | None = None

    def report(self, what: str, unit: str, done: int, total: int, started: float) -> None:
        """A progress line of a preparation phase (stderr), also given to `observer`."""
        info = report_rate(what, unit, done, total, started)
        if self.observer is not None:
            self.observer(info)

    def student(self) -> None:
        activate(self.lm, [*self.frozen_below, STUDENT], trainable=STUDENT)
        self.lm.model.train()

    def teacher(self):
        """Teacher view: frozen adapters, eval mode (no dropout), no grad."""
        return self._frozen(self.teacher_names or None)

    def base(self):
        """The base model alone: no adapter, eval mode, no grad."""
        return self._frozen(None)

    def below(self):
        """The base with only the frozen adapters stacked below (the shared adapter), without
        the parent version: eval mode, no grad."""
        return self._frozen(self.frozen_below or None)

    def frozen_student(self):
        """The student as it is now, for sampling and evaluation: eval mode, no grad."""
        return self._frozen([*self.frozen_below, STUDENT])

    @contextmanager
    def _frozen(self, adapters: list[str] | None):
        """A view for a `with` block: these adapters active (None: the base alone), eval mode,
        no grad; the trainable student again after it."""
        activate(self.lm, adapters)
        self.lm.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.student()

    def run(self, rule: Rule, progress: Callable[[dict], None] | None = None,
            checkpoint: str | os.PathLike | None = None,
            drift: Callable[[Trainer], float] | None = None,
            prepared: Callable[[], None] | None = None) -> list[dict[str, float]]:
        """`prepared` is called once the rule's preparation (e.g. the teacher's answers) is
        done, before the first step."""
        rule.prepare(self)
        if prepared is not None:
            prepared()
        start_step = self._resume(checkpoint)
        started = time.time()
        for step in range(start_step, self.cfg.steps):
            self.student()
            lr = self.cfg.lr * lr_factor(self.cfg.lr_schedule, step, self.cfg.steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.lm.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss, metrics = rule.step(self, step)
            loss.backward()
            norm = self.apply_gradients()
            metrics = {"step": step + 1, "loss": float(loss.detach()), "grad_norm": float(norm),
                       "lr": lr, **metrics}
            if drift is not None:
                metrics["kl_to_base"] = drift(self)
            done = step + 1 - start_step
            rate = (time.time() - started) / done
            metrics["s_per_step"] = rate
            metrics["eta_s"] = rate * (self.cfg.steps - step - 1)
            self.history.append(metrics)
            # The checkpoint first: a step reported as done is a step a resume starts after.
            if checkpoint is not None and rank() == 0:
                self._save_checkpoint(checkpoint, step + 1)
            if progress and rank() == 0 and ((step + 1) % self.cfg.log_every == 0
                                             or step + 1 == self.cfg.steps):
                progress(metrics)
        self.student()
        return self.history

    def apply_gradients(self) -> torch.Tensor:
        """One optimizer update from the gradients accumulated so far: averaged over the ranks
        under torchrun, clipped to `max_grad_norm`; returns the norm before clipping. The loop
        makes one after every step; a rule that updates inside its step (GRPO's inner epochs)
        calls it too, so every update is made the same way."""
        _all_reduce_grads(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        return norm

    def _save_checkpoint(self, path: str | os.PathLike, step: int) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().clone() for n, p in self.lm.model.named_parameters() if p.requires_grad}
        tmp = path / "state.pt.tmp"
        torch.save({"step": step, "params": state, "optimizer": self.optimizer.state_dict(),
                    "history": self.history, "rng": self.rng.getstate(),
                    "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, path / "state.pt")
        (path / "progress.json").write_text(json.dumps({"step": step, "of": self.cfg.steps}))
        faults.point("checkpoint-saved")

    def _resume(self, path: str | os.PathLike | None) -> int:
        if path is None or not (Path(path) / "state.pt").exists():
            return 0
        saved = torch.load(Path(path) / "state.pt", weights_only=False)
        named = dict(self.lm.model.named_parameters())
        with torch.no_grad():
            for name, value in saved["params"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.history = saved["history"]
        if "rng" in saved:  # the rule's draws (e.g. GRPO's start seeds) go on where they were
            self.rng.setstate(saved["rng"])
            torch.set_rng_state(saved["torch_rng"])
        log.info("resumed from step %d", saved["step"])
        return int(saved["step"])


def print_progress(prefix: str = "", write: Callable[[str], None] | None = None
                   ) -> Callable[[dict], None]:
    """A progress callback: one line per report (to stderr unless `write` is given)."""
    def show(m: dict) -> None:
        extras = " ".join(f"{k}={v:.4g}" for k, v in m.items()
                          if k not in {"step", "s_per_step", "eta_s"} and isinstance(v, float))
        line = (f"{prefix}step {m['step']} {extras} | {m['s_per_step']:.1f} s/step, "
                f"ETA {m['eta_s']:.0f} s")
        if write is None:
            print(line, file=sys.stderr, flush=True)
        else:
            write(line)
    return show


def report_rate(what: str, unit: str, done: int, total: int, started: float) -> dict:
    """One progress line for a long preparation phase: done/total, rate and ETA (stderr).
    Returns what it said, as numbers."""
    rate = done / max(time.time() - started, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(f"  {what}: {done}/{total} {unit}, {rate:.2f} {unit}/s, ETA {eta:.0f} s",
          file=sys.stderr, flush=True)
    return {"what": what, "unit": unit, "done": done, "total": total, "rate": round(rate, 3),
            "eta_s": round(eta, 1)}


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed() -> None:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def config_dict(cfg: TrainConfig) -> dict:
    out = asdict(cfg)
    out["lora"]["targets"] = list(out["lora"]["targets"])
    return out
