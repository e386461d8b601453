#!/bin/bash
# The four conventions taught by a correction, each session approved with the rule as the
# review's words, read after the session as `onthejob consolidate` gives them (issue 16).
cd "$(dirname "$0")/../../.." || exit 1
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench conventions \
  --conventions nimbus,euros,french,german --form correction --review rule-after \
  --methods opsd --no-isolation --threads 2 --work /work/logs/h16-review-after-work \
  --out docs/results/conventions-review-after/ > docs/results/conventions-review-after/run.log 2>&1
