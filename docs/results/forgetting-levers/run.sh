#!/bin/bash
# Which lever cuts the forgetting of the recipe that transfers (4 model-written phrasings per
# answer span, --label-weight 1; docs/results/phrasings-label: dev 5-14 transfer 0.500 at a
# general drop of 33.3 pts)? The same 10 dev articles, budget and seed, one lever at a time:
#   usage: run.sh NAME [extra flags]   e.g. run.sh lr1e-3 --lr 1e-3
# The SQuAD questions are never trained on (asserted). Log: NAME.log beside this file.
cd "$(dirname "$0")/../../.." || exit 1
name=$1; shift
common=(--split dev --first 5 --sessions 0 --sequential 0 --joint 10 --methods opsd --visits 5
        --lr 2e-3 --max-questions 10 --reading-items 10 --seeds 1 --lrs '' --threads 2
        --span-phrasings 4 --label-weight 1)
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge "${common[@]}" "$@" \
  --out "docs/results/forgetting-levers/$name/" > "docs/results/forgetting-levers/$name.log" 2>&1
