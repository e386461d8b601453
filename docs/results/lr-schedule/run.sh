#!/bin/bash
# Does a cosine learning-rate decay (5 % warmup, down to a tenth of lr) transfer more than the
# constant rate? docs/results/phrasings/p1's run (dev articles 5-14, 10 sessions consolidated
# together with opsd, 100 questions never trained on) with --lr-schedule cosine; the constant
# run is p1 itself (rerun on 2026-12-04: the same losses step for step).
cd "$(dirname "$0")/../../.." || exit 1
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge --split dev --first 5 \
  --sessions 0 --sequential 0 --joint 10 --methods opsd --visits 5 --lr 2e-3 --max-questions 10 \
  --reading-items 10 --seeds 1 --lrs '' --threads 2 --lr-schedule cosine \
  --out docs/results/lr-schedule/ > docs/results/lr-schedule/cosine.log 2>&1
