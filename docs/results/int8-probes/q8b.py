# ruff: noqa
# A probe as it was run for docs/RESULTS.md, "Generation without native bf16" (2026-12-03):
# OMP_NUM_THREADS=2 python docs/results/int8-probes/q8b.py [args as in RESULTS.md]
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
from onthejob.model.decoder import quantize_int8

shapes=[(960,576),(576,576),(3072,576),(576,1536)]
L=30
def bench(fn, n=10):
    for _ in range(2): fn()
    t=time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter()-t)/n*1000
ws=[torch.randn(o,i)*0.02 for o,i in shapes]
q=[quantize_int8(w) for w in ws]
wb=[w.bfloat16() for w in ws]
for rows in (1,2,4,8,16,32,64,128):
    xs=[torch.randn(rows,i) for o,i in shapes]
    xb=[x.bfloat16() for x in xs]
    n=10 if rows<32 else 3
    r={'fp32':bench(lambda: [F.linear(x,w) for x,w in zip(xs,ws)],n)*L,
       'bf16':bench(lambda: [F.linear(x,w) for x,w in zip(xb,wb)],n)*L,
       'int8':bench(lambda: [torch.ops.aten._weight_int8pack_mm(x,qq,s) for x,(qq,s) in zip(xb,q)],n)*L}
    print(rows, {k:round(v,1) for k,v in r.items()}, flush=True)
