"""Where a patched HF Llama training step goes: torch.profiler self time per op, per step.

``python -m benchmarks.profile_llama [fp32|bf16]``: the patch suite's Llama (its
``patch_models`` entry: 4x384, GQA 6/2, SwiGLU 1024, B8, T256), original and patched, 3 warm-up
steps then 3 profiled steps each. Prints the top ops by self CPU time (ms per step; the profiler adds a little per op).
"""

import copy
import sys

import torch
from torch.profiler import profile

import fastattn
from benchmarks.run import patch_models


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "fp32"
    torch.manual_seed(0)
    _, _, models = patch_models(quick=False)
    _, make, inputs = next(m for m in models if m[0].startswith("HF Llama 4x384, 6 q"))
    orig = make()
    pat = copy.deepcopy(orig)
    fastattn.patch(pat)
    (ids,) = inputs()

    def step(m):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = m(ids).logits
        return torch.autograd.grad(out.float().mean(), list(m.parameters()), allow_unused=True)

    for m in (orig, pat):
        for _ in range(3):
            step(m)
    for name, m in (("original", orig), ("patched", pat)):
        with profile() as p:
            for _ in range(3):
                step(m)
        events = p.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 3 / 1e3
        print(f"## {name}, {dtype}: {total:.1f} ms self CPU per step\n")
        print("| op | ms per step | calls per step |\n| --- | --- | --- |")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:16]:
            print(f"| {e.key[:80]} | {e.self_cpu_time_total / 3 / 1e3:.1f} | {e.count // 3} |")
        print()


if __name__ == "__main__":
    main()
