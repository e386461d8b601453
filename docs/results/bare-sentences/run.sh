#!/bin/bash
# Does asking noun phrases of sentences that name nothing (--bare-phrases 2) carry to later
# questions on explanatory text? 10 name-poor articles of the extra range (400-999, no split's:
# Steam engine and Oxygen, every 9th of 574-655) consolidated together with the recipe that
# transfers on named text (4 phrasings, --label-weight 1), without and with bare phrases.
#   usage: run.sh NAME [extra flags]   e.g. run.sh bare2 --bare-phrases 2
# The SQuAD questions are never trained on (asserted). Log: NAME.log beside this file.
cd "$(dirname "$0")/../../.." || exit 1
name=$1; shift
common=(--split extra --first 174 --stride 9 --sessions 0 --sequential 0 --joint 10 --methods opsd
        --visits 5 --lr 2e-3 --max-questions 10 --reading-items 10 --seeds 1 --lrs '' --threads 2
        --span-phrasings 4 --label-weight 1)
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge "${common[@]}" "$@" \
  --out "docs/results/bare-sentences/$name/" > "docs/results/bare-sentences/$name.log" 2>&1
