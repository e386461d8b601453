"""How fragile the general questions are: random LoRA noise of growing size on the default
model, its KL to the base on the drift anchors (what the gate's KL measures) beside the
general accuracy; then the same for trained candidate adapters named on the command line.
Usage: python noise.py [SCALE,SCALE,...] [ADAPTER_DIR ...]"""
import sys
import time

import torch

from onthejob.learn.divergence import per_token
from onthejob.learn.drift import DEFAULT_ANCHORS
from onthejob.learn.gate import general_accuracy
from onthejob.learn.scoring import response_logits
from onthejob.model import SamplingParams, generate, load_model, render_ids
from onthejob.model.adapters import LoraSpec, activate, random_lora, use_adapter

lm = load_model(None)
tok = lm.tokenizer
use_adapter(lm, None)
prompts = [render_ids(tok, [{"role": "user", "content": a}]) for a in DEFAULT_ANCHORS]
with torch.no_grad():
    responses = [o.token_ids or [tok.eos_token_id]
                 for o in generate(lm, prompts, SamplingParams(max_tokens=24))]
    base_logits = response_logits(lm, prompts, responses)


def kl() -> float:
    with torch.no_grad():
        return float(per_token(response_logits(lm, prompts, responses), base_logits,
                               "reverse_kl").mean())


print(f"base: general {general_accuracy(lm):.3f}", flush=True)
SCALES = [float(s) for s in (sys.argv[1].split(",") if len(sys.argv) > 1 and "," in sys.argv[1] else ["0.002", "0.004", "0.008"])]
for k, scale in enumerate(SCALES):
    started = time.time()
    random_lora(lm, f"noise{k}", LoraSpec(), seed=k, scale=scale)
    print(f"noise B~N(0,{scale}^2), r=16 all projections: KL {kl():.4f}, general "
          f"{general_accuracy(lm):.3f} ({time.time() - started:.0f} s)", flush=True)
    activate(lm, None)
for path in [p for p in sys.argv[1:] if "," not in p]:
    use_adapter(lm, path)
    print(f"{path}: KL {kl():.4f}, general {general_accuracy(lm):.3f}", flush=True)
