#!/bin/bash
# The four conventions taught by a correction, the rule as the review's words, read after the
# session (as conventions-review-after) and also taught as an instruction on 64 ordinary prompts
# the base writes (--review-prompts 64): does distilling the review's words close the gap to
# memory (the rule in the system prompt)?
cd "$(dirname "$0")/../../.." || exit 1
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench conventions \
  --conventions nimbus,euros,french,german --form correction --review rule-after --review-prompts 64 \
  --methods opsd --no-isolation --threads 2 --work /work/logs/h16-review-prompts64-work \
  --out docs/results/conventions-review-prompts/64/ > docs/results/conventions-review-prompts/64/run.log 2>&1
