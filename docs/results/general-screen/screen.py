"""Screen candidate general questions on the default model, as data/general.json's were: greedy,
24 new tokens, the question followed by ' Answer in a few words.' (learn.evaluate.answer); kept
are those answered right (normalized match of any accepted answer). Candidates that are (part
of) a drift or training anchor are left out first: general questions must be disjoint from
them. Usage: python screen.py candidates.json kept.json"""
import json
import sys
import time

from onthejob.learn.drift import DEFAULT_ANCHORS, TRAINING_ANCHORS
from onthejob.learn.evaluate import answer, contains, normalize
from onthejob.learn.gate import general_set
from onthejob.model import load_model

src, dst = sys.argv[1], sys.argv[2]
candidates = json.load(open(src))
anchors = [normalize(a) for a in (*TRAINING_ANCHORS, *DEFAULT_ANCHORS)]
shipped = {normalize(it["question"]) for it in general_set()}
usable = [(q, a) for q, a in candidates
          if normalize(q) not in shipped and not any(normalize(q) in x for x in anchors)]
print(f"{len(candidates)} candidates, {len(usable)} disjoint from the anchors and the shipped set")
lm = load_model(None)
t0 = time.time()
got = answer(lm, [q for q, _ in usable], [a[0] for _, a in usable]).answers
kept, dropped = [], []
for (q, golds), said in zip(usable, got, strict=True):
    (kept if any(contains(said, g) for g in golds) else dropped).append(
        {"question": q, "answers": golds, "said": said})
print(f"kept {len(kept)} of {len(usable)} in {time.time() - t0:.0f} s")
for d in dropped:
    print(f"  dropped {d['question']!r}: {d['said']!r}")
json.dump({"kept": kept, "dropped": dropped}, open(dst, "w"), indent=1)
