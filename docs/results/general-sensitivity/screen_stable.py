"""Which general questions the default model answers right robustly: right greedy on the base
and under each of four random LoRA perturbations with B ~ N(0, 0.008^2) (KL to the base on the
drift anchors ~0.005, a tenth of a typical trained candidate's). Writes stable.json (the
questions that stayed right under all four) and prints the flips.
Usage: python screen_stable.py OUT_DIR"""
import json
import sys
from pathlib import Path

from onthejob.learn.evaluate import answer, contains
from onthejob.learn.gate import general_set
from onthejob.model import load_model
from onthejob.model.adapters import LoraSpec, activate, random_lora, use_adapter

out = Path(sys.argv[1])
lm = load_model(None)
items = general_set()
qs, golds = [it["question"] for it in items], [it["answers"][0] for it in items]


def right() -> list[bool]:
    said = answer(lm, qs, golds).answers
    return [any(contains(a, g) for g in it["answers"]) for a, it in zip(said, items, strict=True)]


use_adapter(lm, None)
runs = {"base": right()}
for seed in range(4):
    random_lora(lm, f"noise{seed}", LoraSpec(), seed=100 + seed, scale=0.008)
    runs[f"noise seed {100 + seed}"] = right()
    activate(lm, None)
    print(f"seed {100 + seed}: {sum(runs[f'noise seed {100 + seed}'])}/{len(items)} right", flush=True)
stable = [it["question"] for k, it in enumerate(items) if all(r[k] for r in runs.values())]
for k, it in enumerate(items):
    if not all(r[k] for r in runs.values()):
        print(f"fragile: {it['question']!r} right in {sum(r[k] for r in runs.values())} of {len(runs)}")
(out / "stable.json").write_text(json.dumps({"stable": stable, "runs": runs}, indent=1))
print(f"stable: {len(stable)} of {len(items)}")
