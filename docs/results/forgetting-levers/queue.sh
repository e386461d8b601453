#!/bin/bash
# The forgetting levers, then the bare-sentence pair (docs/results/bare-sentences), one after
# another (each run script is read when it starts).
cd "$(dirname "$0")" || exit 1
bash run.sh anchor-weight4 --anchor-weight 4
bash run.sh lr1e-3 --lr 1e-3
bash ../bare-sentences/run.sh bare0
bash ../bare-sentences/run.sh bare2 --bare-phrases 2
bash run.sh self64 --self-anchors 64
