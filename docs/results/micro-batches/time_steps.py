"""Forward and backward of one OPSD step's 16 rows through the LoRA student, as one padded batch
or sorted by length in 2 or 4 passes (tried as OpsdConfig.micro_batches, commit fe9d314, reverted: no gain). Rows: the rule-made practice
prompts of the test split's 40 articles (every 5th of 200-399) in the chat template, with an
answer of 8-24 tokens each, 16 drawn at random a step. Run alone:

    OMP_NUM_THREADS=2 python docs/results/micro-batches/time_steps.py [--steps 12]
"""
import argparse
import json
import random
import statistics
import time

import torch

from onthejob.learn.loop import TrainConfig, Trainer
from onthejob.learn.practice import practice_prompts
from onthejob.learn.scoring import response_logits
from onthejob.model import load_model, render_ids


def bucketed_response_logits(lm, prompts: list,
                             responses: list, groups: int = 1) -> torch.Tensor:
    """`response_logits` with the rows sorted by length and run in `groups` passes, each padded
    only to its own longest row; the logits come back in the rows' own order. A step's rows
    differ in length (a 16-row batch of practice prompts is about a quarter padding), and a
    CPU pays for every padded token."""
    if groups <= 1 or len(prompts) < 2:
        return response_logits(lm, prompts, responses)
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in number")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    size = -(-len(order) // groups)
    per_row: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), size):
        part = order[start:start + size]
        logits = response_logits(lm, [prompts[i] for i in part], [responses[i] for i in part])
        at = 0
        for i in part:
            per_row[i] = logits[at:at + len(responses[i])]
            at += len(responses[i])
    return torch.cat([per_row[i] for i in range(len(prompts))])


ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--steps", type=int, default=12, help="steps timed per setting (default 12)")
ap.add_argument("--data", default="/work/shared/data/squad_seal_val.json")
args = ap.parse_args()
lm = load_model()
trainer = Trainer(lm, TrainConfig(steps=1, lr=0.0))
tok = lm.tokenizer
data = json.load(open(args.data))
prompts = []
for a in range(200, 400, 5):
    ctx = [{"role": "user", "content": "Here is a passage:\n\n" + data[a]["context"]},
           {"role": "assistant", "content": "Thanks."}]
    prompts += [render_ids(tok, [{"role": "user", "content": p.text}])
                for p in practice_prompts(None, ctx, kinds=("rule", "topic"))]
rng = random.Random(0)
steps = [[(rng.choice(prompts), [rng.randrange(1000, 20000) for _ in range(rng.randint(8, 24))])
          for _ in range(16)] for _ in range(args.steps)]
times: dict[int, list[float]] = {1: [], 2: [], 4: []}
for k, rows in enumerate([steps[0], *steps]):  # the first is a warm-up
    for groups in (1, 2, 4):
        t0 = time.perf_counter()
        with torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=trainer.bf16):
            logits = bucketed_response_logits(lm, [p for p, _ in rows], [r for _, r in rows], groups)
        logits.float().logsumexp(-1).mean().backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        if k:
            times[groups].append(time.perf_counter() - t0)
    if k:
        print(f"step {k}/{args.steps}: " + ", ".join(f"{g} pass(es) {times[g][-1]:.2f} s"
                                                   for g in times), flush=True)
padded = {}
for groups in times:
    real = pad = 0
    for rows in steps:
        lens = sorted(len(p) + len(r) for p, r in rows)
        size = -(-16 // groups)
        for s in range(0, 16, size):
            part = lens[s:s + size]
            real += sum(part)
            pad += len(part) * max(part) - sum(part)
    padded[groups] = pad / (real + pad)
print(f"bf16 {trainer.bf16}; {len(prompts)} prompts, mean {statistics.fmean(map(len, prompts)):.1f} tokens")
for groups, ts in times.items():
    print(f"{groups} pass(es): median {statistics.median(ts):.3f} s a step, padding {padded[groups]:.1%}, "
          f"speedup {statistics.median(times[1]) / statistics.median(ts):.2f}x")
