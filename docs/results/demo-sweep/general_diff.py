"""Which general questions a demo's candidate adapter gets wrong that the base got right."""
import glob
import sys

from onthejob.learn.evaluate import answer, contains
from onthejob.learn.gate import general_set
from onthejob.model import load_model
from onthejob.model.adapters import use_adapter

home = sys.argv[1]
paths = sorted(glob.glob(f"{home}/adapters/**/adapter_config.json", recursive=True))
print(paths)
lm = load_model(None)
items = general_set()
qs = [it["question"] for it in items]
use_adapter(lm, None)
base = answer(lm, qs, [it["answers"][0] for it in items]).answers
use_adapter(lm, paths[-1].rsplit("/", 1)[0])
cand = answer(lm, qs, [it["answers"][0] for it in items]).answers
for it, b, c in zip(items, base, cand, strict=True):
    ok_b = any(contains(b, g) for g in it["answers"])
    ok_c = any(contains(c, g) for g in it["answers"])
    if ok_b != ok_c:
        print(f"{it['question']!r}: base {b!r} -> cand {c!r} (want {it['answers']})")
