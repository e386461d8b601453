#!/bin/bash
# The control for run.sh: 4 model-written phrasings per answer span at the same 5 visits a
# prompt, without the label term, so that phrasings and the label term can be told apart
# (docs/results/phrasings/p1 is one phrasing at 5 visits; p4 there had p1's steps, not its visits).
cd "$(dirname "$0")/../../.." || exit 1
common=(--split dev --first 5 --sessions 0 --sequential 0 --joint 10 --methods opsd --visits 5
        --lr 2e-3 --max-questions 10 --reading-items 10 --seeds 1 --lrs '' --threads 2)
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge "${common[@]}" --span-phrasings 4 \
  --out docs/results/phrasings-label/p4-w0/ > docs/results/phrasings-label/p4-w0.log 2>&1
