#!/bin/bash
# The recipe that transferred on the test split (4 model-written phrasings per answer span,
# --label-weight 1: 0.250, general drop 32.5 at lr 2e-3) at lr 1e-3, the forgetting lever that
# worked on dev 5-14 (general drop 33.3 -> 8.3, 11 -> 9 of 100 answered). Seed 0 ran on
# 2026-12-04 (64 min); seed 1 is `SEEDS=1 bash queue.sh`, not run yet.
# Logs: seedN.log beside this file.
cd "$(dirname "$0")/../../.." || exit 1
here=docs/results/test-joint-lr1e-3
for seed in ${SEEDS:-0 1}; do
  bash docs/results/test-joint/run.sh --methods opsd --span-phrasings 4 --label-weight 1 \
    --lr 1e-3 --seed "$seed" --out "$here/seed$seed/" > "$here/seed$seed.log" 2>&1
done
