#!/bin/bash
# Does the label term (--label-weight 1, which made the student fit 45.8 % of its lessons) carry
# to paraphrases when each answer span is also asked in 4 model-written phrasings? The same 10
# dev articles (5-14) consolidated together with opsd at 5 visits a prompt (more prompts, so more
# steps than docs/results/label-weight); the SQuAD questions are never trained on (asserted).
cd "$(dirname "$0")/../../.." || exit 1
common=(--split dev --first 5 --sessions 0 --sequential 0 --joint 10 --methods opsd --visits 5
        --lr 2e-3 --max-questions 10 --reading-items 10 --seeds 1 --lrs '' --threads 2)
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge "${common[@]}" --span-phrasings 4 \
  --label-weight 1 --out docs/results/phrasings-label/p4-w1/ > docs/results/phrasings-label/p4-w1.log 2>&1
