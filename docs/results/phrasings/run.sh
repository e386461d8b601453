#!/bin/bash
# Does asking each answer span in 4 model-written phrasings (beside the rule-made question)
# transfer more than one, at the same training steps? 10 dev articles (5-14) consolidated
# together with opsd; the SQuAD questions (never trained on, asserted) are the paraphrases.
cd "$(dirname "$0")/../../.." || exit 1
common=(--split dev --first 5 --sessions 0 --sequential 0 --joint 10 --methods opsd --visits 5
        --lr 2e-3 --max-questions 10 --reading-items 10 --seeds 1 --lrs '' --threads 2)
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge "${common[@]}" --span-phrasings 1 \
  --out docs/results/phrasings/p1/ > docs/results/phrasings/p1.log 2>&1
steps=$(.venv/bin/python -c "import json; print(len(json.load(open('docs/results/phrasings/p1/report.json'))['joint']['methods']['opsd']['loss_curve']))")
echo "p1 trained $steps steps; p4 trains the same" >> docs/results/phrasings/p1.log
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob bench knowledge "${common[@]}" --span-phrasings 4 \
  --joint-steps "$steps" --out docs/results/phrasings/p4/ > docs/results/phrasings/p4.log 2>&1
