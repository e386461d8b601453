#!/bin/sh
# Issue 13's test-split run: 40 articles (200-239, 158 questions) consolidated together as one tenant's batch.
# Run from a checkout: PYTHONPATH=src python -m onthejob.cli ... ; log beside this script.
exec onthejob bench knowledge --data /work/shared/data/squad_seal_val.json --split test \
  --sessions 0 --sequential 0 --joint 40 --methods opsd,sft,notes,compact --visits 5 --lr 2e-3 \
  --max-questions 10 --reading-items 20 --general-items 40 --seeds 1 --lrs '' --threads 2 \
  --out docs/results/test-split/
