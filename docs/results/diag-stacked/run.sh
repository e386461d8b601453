#!/bin/bash
# Dev diagnostic of chained rounds, continued: the same 15 Nikola Tesla paragraphs (dev 148-162)
# in 3 rounds of 5 as docs/results/diag-rounds/, each round a fresh adapter stacked over the
# earlier rounds' frozen ones (opsd-stacked) instead of a child continuing its parent.
cd "$(dirname "$0")/../../.." || exit 1
exec flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge \
  --data /work/shared/data/squad_seal_val.json --split dev --first 148 \
  --sessions 0 --sequential 0 --joint 15 --rounds 3 --methods opsd-stacked \
  --visits 5 --lr 2e-3 --max-questions 10 --reading-items 20 --general-items 40 --seeds 1 \
  --lrs '' --threads 2 --out docs/results/diag-stacked/ "$@"
