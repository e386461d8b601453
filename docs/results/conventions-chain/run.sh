#!/bin/bash
# The 10-round conventions chain with the promotion gate on its stable general questions
# (issue 16's retention figure); opsd only, no isolation or shared parts. ~60 min on 2 cores.
cd "$(dirname "$0")/../../.." || exit 1
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench conventions \
  --conventions celsius,nimbus,backticks,no-exclamation,short-answers,euros,northwind,french,spanish,german \
  --methods opsd --retention 10 --no-isolation --threads 2 --work /work/logs/h16-chain-work \
  --out docs/results/conventions-chain/ > docs/results/conventions-chain/run.log 2>&1
