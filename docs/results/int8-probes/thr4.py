# ruff: noqa
# A probe as it was run for docs/RESULTS.md, "Generation without native bf16" (2026-12-03):
# OMP_NUM_THREADS=2 python docs/results/int8-probes/thr4.py [args as in RESULTS.md]
import os
import sys
import threading

import torch

from onthejob.model.engine import PRECISIONS, decode_rate
from onthejob.model.load import load_model

torch.set_num_threads(2)
lm = load_model()
dt = PRECISIONS["int8"]
def cpu():
    d = {}
    for t in os.listdir("/proc/self/task"):
        f = open(f"/proc/self/task/{t}/stat").read().split(")")[-1].split()
        d[t] = int(f[11]) + int(f[12])
    return d
if sys.argv[1] == "1":
    decode_rate(lm, dt, tokens=8); print("main", round(decode_rate(lm, dt, tokens=48),1))
out=[]
before = cpu()
t = threading.Thread(target=lambda: out.extend(round(decode_rate(lm, dt, tokens=48),1) for _ in range(3)))
t.start(); t.join()
after = cpu()
print("worker", out, "ticks per thread:", {k: after[k]-before.get(k,0) for k in after if after[k]-before.get(k,0) > 0}, "main tid", threading.get_native_id())
