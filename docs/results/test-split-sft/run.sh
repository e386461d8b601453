#!/bin/sh
# The sft baseline on issue 13's test-split sessions (40 articles, 158 questions), the same
# settings as ../test-split/run.sh (which was stopped after opsd).
exec onthejob bench knowledge --data /work/shared/data/squad_seal_val.json --split test \
  --sessions 0 --sequential 0 --joint 40 --methods sft --visits 5 --lr 2e-3 \
  --max-questions 10 --reading-items 20 --general-items 40 --seeds 1 --lrs '' --threads 2 \
  --out docs/results/test-split-sft/
