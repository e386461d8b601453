"""Does a lower decode precision cost answers? The default model's general questions and
in-context reading items (the forgetting measures' sets, learn/gate.py) answered greedily at
each precision, with the greedy answers compared to float32's.

    OMP_NUM_THREADS=2 python docs/results/int8-quality/quality.py --out docs/results/int8-quality/quality.md
"""

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

from onthejob.bench.measures import general_right
from onthejob.learn.evaluate import answer
from onthejob.learn.gate import general_set, retention_set
from onthejob.model.engine import PRECISIONS, precision_problem
from onthejob.model.load import LoadedModel, load_model


def use_precision(lm: LoadedModel, name: str) -> bool:
    """Switch `lm`'s decoding to precision `name`; False (and why, printed) where it cannot run."""
    problem = precision_problem(name, lm.device)
    if problem:
        print(f"{name} skipped: {problem}", flush=True)
        return False
    lm.decode_dtype, lm.decoder_cache = PRECISIONS[name], None
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lm = load_model()
    general = general_set()
    reading = retention_set()
    rows, answers = [], {}
    for name in args.precisions.split(","):
        if not use_precision(lm, name):
            continue
        started = time.perf_counter()
        g = answer(lm, [it["question"] for it in general], [it["answers"][0] for it in general])
        g_right = sum(general_right(g.answers, general))
        qs = [f"{it['context']}\n\nQuestion: {it['question']}" for it in reading]
        r = answer(lm, qs, [it["answer"] for it in reading])
        answers[name] = g.answers + r.answers
        same = sum(a == b for a, b in zip(answers[name], answers.get("float32", answers[name]),
                                          strict=True))
        rows.append(f"| {name} | {g_right}/{len(general)} | {round(r.accuracy * len(reading))}/"
                    f"{len(reading)} | {same}/{len(answers[name])} | "
                    f"{time.perf_counter() - started:.0f} |")
        print(rows[-1], flush=True)
    text = ("# Answers by decode precision\n\n"
            f"Command: `OMP_NUM_THREADS=2 python docs/results/int8-quality/quality.py --out "
            f"{args.out}`  \nDate: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; model {lm.name}, "
            "no adapter, greedy.\n\n"
            "| precision | general right | reading right | answers identical to float32 | s |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
