#!/bin/bash
# The test split as a tenant would see it: 40 articles sampled across the split's four subjects
# (every 5th of 200-399: 179 questions), consolidated in 8 nightly rounds of 5 sessions, each
# version a child of the last; opsd, then compact, sft and notes on the same sessions and rounds.
# Results so far are in report-partial.json after each method; the log is log.txt.
cd "$(dirname "$0")/../../.." || exit 1
exec flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge \
  --data /work/shared/data/squad_seal_val.json --split test --stride 5 \
  --sessions 0 --sequential 0 --joint 40 --rounds 8 --methods opsd,compact,sft,notes \
  --visits 5 --lr 2e-3 --max-questions 10 --reading-items 20 --general-items 40 --seeds 1 \
  --lrs '' --threads 2 --out docs/results/test-rounds/ "$@"
