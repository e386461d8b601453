"""Run by tests/test_ddp.py under torchrun: two ranks train one adapter data-parallel."""

import hashlib
import sys

import torch

from onthejob.learn.lesson import Lesson
from onthejob.learn.loop import TrainConfig, Trainer, init_distributed, rank
from onthejob.learn.sft import Sft
from onthejob.model import tiny_model

init_distributed()
lm = tiny_model(seed=0)
lessons = [Lesson(f"s{i}", [{"role": "user", "content": f"Fact number {i}: the sky is {c}."}])
           for i, c in enumerate(["blue", "green", "red", "grey"])]
trainer = Trainer(lm, TrainConfig(steps=3, lr=1e-2, bf16=False, seed=rank()))
history = trainer.run(Sft(lessons, lm.tokenizer, batch_size=1))
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.params)).hexdigest()
moved = any(float(p.detach().abs().sum()) > 0 for n, p in lm.model.named_parameters() if "lora_B" in n)
with open(sys.argv[1] + f".rank{rank()}", "w") as f:
    f.write(f"{digest} {moved} {len(history)}\n")
torch.distributed.destroy_process_group()
