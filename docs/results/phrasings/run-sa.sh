#!/bin/bash
# p1 (run.sh) again with 256 self-written anchors (--self-anchors 256) at the same steps: does
# holding many more ordinary prompts still cut the general and reading drop, and at what cost
# to transfer?
cd "$(dirname "$0")/../../.." || exit 1
steps=$(.venv/bin/python -c "import json; print(len(json.load(open('docs/results/phrasings/p1/report.json'))['joint']['methods']['opsd']['loss_curve']))")
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge --split dev --first 5 --sessions 0 \
  --sequential 0 --joint 10 --methods opsd --visits 5 --lr 2e-3 --max-questions 10 --reading-items 10 \
  --seeds 1 --lrs '' --threads 2 --span-phrasings 1 --self-anchors 256 --joint-steps "$steps" \
  --out docs/results/phrasings/p1-sa256/ > docs/results/phrasings/p1-sa256.log 2>&1
