#!/bin/bash
# `onthejob demo` with seeds 0-2, one after another; each prints "learned N of 2 facts".
# A seed counts as learned when its served adapter (the gate promoted it) answers at least
# one of the two paraphrased questions it never trained on. Log: log.txt beside this file.
cd "$(dirname "$0")/../../.." || exit 1
for seed in 0 1 2; do
  echo "== seed $seed"
  flock /tmp/onthejob-heavy.lock .venv/bin/onthejob demo --seed "$seed" "$@"
done
echo "== seeds learned: $(grep -c '^learned [1-9]' "$(dirname "$0")/log.txt" 2>/dev/null || echo '?') of 3"
