"""Rule-span coverage of the gold answers (learn/practice.py `coverage`, the share a prompt's
known span matches at token F1 >= 0.5) by --bare-phrases, per split and subject: rules only, no
model, so it takes seconds. Usage: .venv/bin/python docs/results/bare-sentences/coverage.py"""

import json
import sys
from collections import defaultdict

from onthejob.bench.knowledge import SPLITS
from onthejob.learn.practice import PracticePrompt, covered, sentences_of, span_units

DATA = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/squad_seal_val.json"


def main() -> None:
    articles = json.load(open(DATA))
    print("| split | subject | articles | bare phrases | spans a sentence | coverage |")
    print("|---|---|---|---|---|---|")
    for split, (lo, hi) in SPLITS.items():
        for n in (0, 1, 2, 3):
            rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
            for i in range(lo, min(hi, len(articles))):
                a = articles[i]
                units = span_units(a["context"], bare_phrases=n)
                golds = [q["answer"] for q in a["questions"]]
                hit = covered([PracticePrompt("", "rule", answer=s) for _, s in units], golds)
                for key in (a["title"], "(all)"):
                    r = rows[key]
                    r[0] += 1
                    r[1] += len(sentences_of(a["context"]))
                    r[2] += len(units)
                    r[3] += sum(hit)
                    r[4] += len(golds)
            for key, (k, s, u, c, g) in rows.items():
                if key == "(all)" or split != "extra":
                    print(f"| {split} | {key} | {k} | {n} | {u / s:.2f} | {c / g:.3f} |")


if __name__ == "__main__":
    main()
