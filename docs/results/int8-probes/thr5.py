# ruff: noqa
# A probe as it was run for docs/RESULTS.md, "Generation without native bf16" (2026-12-03):
# OMP_NUM_THREADS=2 python docs/results/int8-probes/thr5.py [args as in RESULTS.md]
import threading

import torch

from onthejob.model.engine import PRECISIONS, decode_rate
from onthejob.model.load import load_model

torch.set_num_threads(2)
lm = load_model()
dt = PRECISIONS["int8"]
def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn())); t.start(); t.join()
    return out[0]
print("warm-up in a thread that exits:", round(in_thread(lambda: decode_rate(lm, dt, tokens=48)), 1))
print("worker after it:", [round(in_thread(lambda: decode_rate(lm, dt, tokens=48)), 1) for _ in range(3)])
print("main now:", round(decode_rate(lm, dt, tokens=48), 1))
print("worker after main:", [round(in_thread(lambda: decode_rate(lm, dt, tokens=48)), 1) for _ in range(3)])
