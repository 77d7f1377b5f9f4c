import sys, time, torch, statistics as st
import fastattn
torch.set_num_threads(1)
torch.manual_seed(0)
res = {}
def t(name, fn, reps=15):
    for _ in range(3): fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time(); fn(); ts.append(time.thread_time() - t0)
    res[name] = min(ts) * 1e3
for (N, M) in [(8192, 768), (32768, 1024)]:
    x = torch.randn(N, M, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(N, M, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(M, requires_grad=True); b = torch.randn(M, requires_grad=True)
    g = torch.randn(N, M, dtype=torch.bfloat16)
    with torch.no_grad():
        t(f"ln fwd {N}x{M}", lambda: fastattn.layer_norm(x, (M,), w, b))
    def fb():
        y = fastattn.layer_norm(x, (M,), w, b); y.backward(g)
    t(f"ln fwd+bwd {N}x{M}", fb)
    def afb():
        y, s = fastattn.add_layer_norm(x, r, (M,), w, b)
        torch.autograd.backward([y, s], [g, g])
    if hasattr(fastattn, "add_layer_norm"):
        try: t(f"addln fwd+bwd {N}x{M}", afb)
        except Exception as e: print(e)
print(" ".join(f"{k}={v:.3f}" for k, v in res.items()))
