#!/bin/bash
# Does a cross-entropy term on the teacher's kept answer tokens (--label-weight 1) make the
# student fit its lessons, and transfer more? docs/results/visits/v5's run (dev articles 5-14,
# 10 sessions together, opsd, 5 visits, lr 2e-3) with the term added on lesson rows.
cd "$(dirname "$0")/../../.." || exit 1
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge --split dev --first 5 \
  --sessions 0 --sequential 0 --joint 10 --methods opsd --visits 5 --lr 2e-3 --max-questions 10 \
  --reading-items 10 --seeds 1 --lrs '' --threads 2 --label-weight 1 \
  --out docs/results/label-weight/w1/ > docs/results/label-weight/w1.log 2>&1
