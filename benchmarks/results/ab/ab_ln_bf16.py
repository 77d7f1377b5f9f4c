"""The A/B script behind bf16-stores-20261207.md: fastattn's CPU LayerNorm / add_layer_norm in
bfloat16, 1 thread, thread CPU time, min of 15 calls after 3 warm-ups. Run it once per build
(the old one by PYTHONPATH), alternating."""

import time

import torch

import fastattn

torch.set_num_threads(1)
torch.manual_seed(0)
res: dict[str, float] = {}


def t(name, fn, reps=15):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    res[name] = min(ts) * 1e3


for n, m in [(8192, 768), (32768, 1024)]:
    x = torch.randn(n, m, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(n, m, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(m, requires_grad=True)
    b = torch.randn(m, requires_grad=True)
    g = torch.randn(n, m, dtype=torch.bfloat16)
    with torch.no_grad():
        t(f"ln fwd {n}x{m}", lambda: fastattn.layer_norm(x, (m,), w, b))

    def fb():
        fastattn.layer_norm(x, (m,), w, b).backward(g)

    def afb():
        y, s = fastattn.add_layer_norm(x, r, (m,), w, b)
        torch.autograd.backward([y, s], [g, g])

    t(f"ln fwd+bwd {n}x{m}", fb)
    t(f"addln fwd+bwd {n}x{m}", afb)
print(" ".join(f"{k}={v:.3f}" for k, v in res.items()))
