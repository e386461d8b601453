#!/bin/bash
# The levers, one after another (each script is read when it starts).
cd "$(dirname "$0")" || exit 1
bash run.sh anchor-weight4 --anchor-weight 4
bash run.sh self64 --self-anchors 64
bash run.sh lr1e-3 --lr 1e-3
bash run.sh mlp --lora-modules mlp
