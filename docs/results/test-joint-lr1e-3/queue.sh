#!/bin/bash
# The recipe that transferred on the test split (4 model-written phrasings per answer span,
# --label-weight 1: 0.250, general drop 32.5 at lr 2e-3) at lr 1e-3, the forgetting lever that
# worked on dev 5-14 (general drop 33.3 -> 8.3, 11 -> 9 of 100 answered), with two seeds; then
# the nightly consolidation alone on the machine with the 5-visit default.
# Logs: seedN.log beside this file; the nightly log in docs/results/nightly/.
cd "$(dirname "$0")/../../.." || exit 1
here=docs/results/test-joint-lr1e-3
for seed in 0 1; do
  bash docs/results/test-joint/run.sh --methods opsd --span-phrasings 4 --label-weight 1 \
    --lr 1e-3 --seed "$seed" --out "$here/seed$seed/" > "$here/seed$seed.log" 2>&1
done
export ONTHEJOB_HOME=/tmp/onthejob-nightly-$$
rm -rf "$ONTHEJOB_HOME"
.venv/bin/python docs/results/nightly/setup_sessions.py /work/shared/data/squad_seal_val.json
start=$(date +%s)
PATH=$PWD/.venv/bin:$PATH flock /tmp/onthejob-heavy.lock bash docs/results/nightly/nightly.sh \
  > docs/results/nightly/nightly-2026-12-04-5visits-alone.log 2>&1
echo "nightly wall s: $(( $(date +%s) - start ))" >> docs/results/nightly/nightly-2026-12-04-5visits-alone.log
