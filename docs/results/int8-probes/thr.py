# ruff: noqa
# A probe as it was run for docs/RESULTS.md, "Generation without native bf16" (2026-12-03):
# OMP_NUM_THREADS=2 python docs/results/int8-probes/thr.py [args as in RESULTS.md]
"""Greedy decode rate in the main thread vs a worker thread (the server's engine runs in one)."""
import sys
import threading

import torch

from onthejob.model.engine import PRECISIONS, decode_rate
from onthejob.model.load import load_model

torch.set_num_threads(2)
lm = load_model()
for name in sys.argv[1].split(","):
    dt = PRECISIONS[name]
    decode_rate(lm, dt, tokens=8)
    main = [decode_rate(lm, dt, tokens=48) for _ in range(2)]
    out = []
    t = threading.Thread(target=lambda: out.extend(decode_rate(lm, dt, tokens=48) for _ in range(3)))
    t.start(); t.join()
    main2 = [decode_rate(lm, dt, tokens=48) for _ in range(2)]
    print(f"{name}: main {['%.1f' % r for r in main]} worker {['%.1f' % r for r in out]} main again {['%.1f' % r for r in main2]}", flush=True)
