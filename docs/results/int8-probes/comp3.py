# ruff: noqa
# A probe as it was run for docs/RESULTS.md, "Generation without native bf16" (2026-12-03):
# OMP_NUM_THREADS=2 python docs/results/int8-probes/comp3.py [args as in RESULTS.md]
import sys
import time

import torch

from onthejob.model.engine import PRECISIONS, decode_rate, warm_compiled
from onthejob.model.load import load_model

torch.set_num_threads(2)
lm = load_model()
for name in sys.argv[1].split(","):
    dt = PRECISIONS[name]
    lm.decode_dtype = dt; lm.decoder_cache = None; lm.decode_compiled = False
    e1 = [round(decode_rate(lm, dt, tokens=48), 1) for _ in range(2)]
    e8 = round(decode_rate(lm, dt, tokens=32, batch=8), 1)
    t = time.perf_counter()
    s = warm_compiled(lm)
    c1 = [round(decode_rate(lm, dt, tokens=48), 1) for _ in range(2)]
    c8 = round(decode_rate(lm, dt, tokens=32, batch=8), 1)
    print(name, "eager b1", e1, "b8", e8, "| compile", round(s), "s | compiled b1", c1, "b8", c8, flush=True)
