#!/bin/bash
# The test split as one tenant's batch: the 40 articles of docs/results/test-rounds (every 5th
# of 200-399, the split's four subjects, 179 questions) consolidated together into one adapter
# with opsd, beside compact (the summary in context); never trained on the questions (asserted).
# Extra flags (e.g. --lr-schedule cosine) are passed on. Log: log.txt beside this file.
cd "$(dirname "$0")/../../.." || exit 1
exec flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge \
  --data /work/shared/data/squad_seal_val.json --split test --stride 5 \
  --sessions 0 --sequential 0 --joint 40 --methods opsd,compact \
  --visits 5 --lr 2e-3 --max-questions 10 --reading-items 20 --general-items 40 --seeds 1 \
  --lrs '' --threads 2 --out docs/results/test-joint/ "$@"
