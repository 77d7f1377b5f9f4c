"""Quick A/B timing of the kernel alone, for tuning on a shared, loaded machine: min over reps
of the process CPU time / 2 (2 threads), which time-sharing with other processes inflates less
than wall time does.

    PYTHONPATH=. python dev/attention_cpu/tune.py [reps]
"""

import math
import sys
import time

import fastattn._C  # noqa: F401
import torch

OP = torch.ops.fastattn_C
torch.set_num_threads(2)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
B, H, D = 4, 12, 64
for T in (512, 1024, 2048):
    q, k, v, do = (torch.randn(B, H, T, D) for _ in range(4))
    sc = 1 / math.sqrt(D)
    flop = 2 * B * H * T * T * D
    o, lse = OP.attention_fwd(q, k, v, None, True, sc, 0.0, 0, 0)
    tf, tb = [], []
    for _ in range(reps):
        t0 = time.process_time()
        o, lse = OP.attention_fwd(q, k, v, None, True, sc, 0.0, 0, 0)
        t1 = time.process_time()
        OP.attention_bwd(do, q, k, v, o, lse, None, True, sc, 0.0, 0, 0)
        t2 = time.process_time()
        tf.append(t1 - t0)
        tb.append(t2 - t1)
    f, b = min(tf) / 2, min(tb) / 2
    print(
        f"T={T}: fwd {flop / f / 1e9:6.1f} GF/s  bwd {2.5 * flop / b / 1e9:6.1f} GF/s  "
        f"fwd+bwd {3.5 * flop / (f + b) / 1e9:6.1f} GF/s"
    )

# The same metric for a large float32 matmul: the machine's ceiling under the same load.
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a @ b
ts = []
for _ in range(reps):
    t0 = time.process_time()
    a @ b
    ts.append((time.process_time() - t0) / 2)
print(f"fp32 matmul 2048^3 ceiling: {2 * 2048**3 / min(ts) / 1e9:6.1f} GF/s")
