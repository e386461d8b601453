#!/bin/bash
# The budget in visits (issue 13: "measure N"): docs/results/phrasings/p1's run (dev articles
# 5-14, 10 sessions consolidated together with opsd, lr 2e-3, 100 questions never trained on)
# at 5 and 10 visits per practice prompt, with practice recall (the trained prompts answered
# without context) beside transfer (paraphrases never trained on).
cd "$(dirname "$0")/../../.." || exit 1
common=(--split dev --first 5 --sessions 0 --sequential 0 --joint 10 --methods opsd --lr 2e-3
        --max-questions 10 --reading-items 10 --seeds 1 --lrs '' --threads 2)
for v in 5 10; do
  flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge "${common[@]}" --visits "$v" \
    --out "docs/results/visits/v$v/" > "docs/results/visits/v$v.log" 2>&1
done
