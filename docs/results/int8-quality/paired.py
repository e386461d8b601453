"""Does a lower decode precision cost answers, beyond chance? quality.py asked the 86 general
questions, which were chosen because float32 answers them right: any change to the weights can
only lose there (random adapter noise at KL 0.005 lost 5.8 points of them,
docs/results/general-sensitivity/). This asks, beside them, an unselected set: in-context
reading of one SQuAD question from each of N articles of the never-trained range (1000+), and
compares every precision with float32 question by question (paired): how many only float32
answers right, how many only the other, and the exact two-sided sign test on those
discordant pairs (McNemar). Greedy, no adapter.

    OMP_NUM_THREADS=2 python docs/results/int8-quality/paired.py --out docs/results/int8-quality/paired.md
"""

import argparse
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

from quality import use_precision  # the script beside this one

from onthejob.bench.measures import general_right, reading_prompt, reading_set
from onthejob.learn.evaluate import answer
from onthejob.learn.gate import general_set
from onthejob.model.load import load_model

DATA = "/work/shared/data/squad_seal_val.json"


def sign_test(a: int, b: int) -> float:
    """Exact two-sided binomial p-value of a split of a + b discordant pairs at 1/2."""
    n = a + b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--reading", type=int, default=300, help="articles 1000.. asked in context")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    names = args.precisions.split(",")
    if names[0] != "float32":
        parser.error("--precisions must start with float32 (the reference)")
    lm = load_model()
    general = general_set()
    reading = reading_set(json.load(open(args.data)), args.reading)
    sets = {"general (chosen: float32 right)": None, "general, stable ones": None,
            f"reading in context ({len(reading)}, unselected)": None}
    right: dict[str, dict[str, list[bool]]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        if not use_precision(lm, name):
            continue
        started = time.perf_counter()
        g = answer(lm, [it["question"] for it in general], [it["answers"][0] for it in general])
        g_right = general_right(g.answers, general)
        r = answer(lm, [reading_prompt(it) for it in reading], [it["answer"] for it in reading],
                   batch=16)
        keys = list(sets)
        right[name] = {keys[0]: g_right,
                       keys[1]: [ok for ok, it in zip(g_right, general, strict=True)
                                 if it.get("stable", True)],
                       keys[2]: list(r.correct)}
        seconds[name] = time.perf_counter() - started
        print(name, {k: sum(v) for k, v in right[name].items()}, f"{seconds[name]:.0f} s", flush=True)
    lines = ["| precision | set | right | only float32 right | only this right | sign test p |",
             "|---|---|---|---|---|---|"]
    for name, per in right.items():
        for key, got in per.items():
            ref = right["float32"][key]
            lost = sum(a and not b for a, b in zip(ref, got, strict=True))
            won = sum(b and not a for a, b in zip(ref, got, strict=True))
            lines.append(f"| {name} | {key} | {sum(got)}/{len(got)} | {lost} | {won} | "
                         f"{sign_test(lost, won):.3f} |")
    text = ("# Answers by decode precision, paired with float32\n\n"
            f"Command: `OMP_NUM_THREADS=2 python docs/results/int8-quality/paired.py --out "
            f"{args.out}`  \nDate: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; model {lm.name}, no "
            "adapter, greedy; seconds per precision: "
            + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()) + ".\n\n"
            + "\n".join(lines) + "\n")
    Path(args.out).write_text(text)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
