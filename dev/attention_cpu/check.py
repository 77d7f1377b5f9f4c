"""Correctness of the CPU attention kernel (torch.ops.fastattn_C.attention_fwd / _bwd).

    PYTHONPATH=. python dev/attention_cpu/check.py [--quick] [--threads N]

Reference: softmax(scale * Q K^T + mask) V materialised in float64 (GQA by repeating K/V per
query head, causal bottom-right aligned, key padding, dropout with the same Philox mask built
here in numpy), gradients by torch.autograd. A kernel result in dtype X passes when its max abs
error is <= 2 x (the error of the same materialised computation run by PyTorch in X) + a small
floor, for out, lse and dq, dk, dv. Also: non-contiguous inputs, fully padded batch rows,
dropout fraction, determinism, T=16384 memory, input validation.
"""

from __future__ import annotations

import argparse
import itertools
import math
import resource

import fastattn._C  # noqa: F401
import numpy as np
import torch

OP = torch.ops.fastattn_C
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-3, torch.float64: 1e-12}


# ----------------------------------------------------------------------------- Philox
def philox_c0(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10, first output word, on uint64 arrays holding uint32 values."""
    M = np.uint64(0xFFFFFFFF)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) & M for x in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0) & M, np.uint64(k1) & M
    for _ in range(10):
        a0, a2 = c0, c2
        pb, pa = B * a2, A * a0
        c0 = (pb >> np.uint64(32)) ^ c1 ^ k0
        c2 = (pa >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = pb & M, pa & M
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & M, (k1 + np.uint64(0xBB67AE85)) & M
    return c0


def philox_kat():
    # Random123 known-answer vectors for philox4x32_10 (first word).
    assert int(philox_c0(0, 0, 0, 0, 0, 0)) == 0x6627E8D5
    f = 0xFFFFFFFF
    assert int(philox_c0(f, f, f, f, f, f)) == 0x408F276D
    print("philox known-answer vectors: ok")


def keep_mask(B, Hq, Tq, Tk, p, seed, offset):
    """[B, Hq, Tq, Tk] bool: True where the element is kept."""
    b, h, i, j = np.meshgrid(
        np.arange(B), np.arange(Hq), np.arange(Tq), np.arange(Tk), indexing="ij"
    )
    w = philox_c0(
        j, i, b * Hq + h, offset & 0xFFFFFFFF, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    )
    u = (w >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)
    return torch.from_numpy(u >= np.float32(p))


# ----------------------------------------------------------------------------- reference
def reference(q, k, v, causal, scale, kpm=None, keep=None, p=0.0):
    """Materialised attention in q's dtype; returns (out, lse) with lse=+inf for empty rows."""
    Hq, Hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(Hq // Hkv, 1)
    vv = v.repeat_interleave(Hq // Hkv, 1)
    Tq, Tk = q.shape[2], k.shape[2]
    s = (q @ kk.transpose(-1, -2)) * scale
    masked = torch.zeros(q.shape[0], 1, Tq, Tk, dtype=torch.bool)
    if causal:
        i = torch.arange(Tq)[:, None]
        j = torch.arange(Tk)[None]
        masked = masked | (j > i + Tk - Tq)
    if kpm is not None:
        masked = masked | kpm[:, None, None, :]
    s = s.masked_fill(masked, float("-inf"))
    empty = masked.all(-1, keepdim=True)
    lse = torch.logsumexp(s.float() if s.dtype == torch.bfloat16 else s, -1)
    lse = lse.masked_fill(empty.squeeze(-1).expand_as(lse), float("inf"))
    pm = torch.softmax(s.masked_fill(empty, 0.0), -1) * (~empty)
    if keep is not None:
        pm = pm * keep.to(pm.dtype) / (1 - p)
    return pm @ vv, lse


def run_ref(q, k, v, do, dtype, **kw):
    qd, kd, vd = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o, lse = reference(qd, kd, vd, **kw)
    o.backward(do.to(dtype))
    return o.detach(), lse.detach(), qd.grad, kd.grad, vd.grad


def err(a, r):
    a, r = a.double(), r.double()
    fin = torch.isfinite(r)
    assert torch.equal(fin, torch.isfinite(a)) or (~fin).sum() == 0, "inf pattern differs"
    if not torch.equal(a[~fin], r[~fin]):
        return float("inf")
    return (a[fin] - r[fin]).abs().max().item() if fin.any() else 0.0


NAMES = ("out", "lse", "dq", "dk", "dv")


def check_case(
    B,
    Hq,
    Hkv,
    Tq,
    Tk,
    D,
    causal,
    dtype,
    kpm=None,
    p=0.0,
    seed=0,
    offset=0,
    layout="contig",
    verbose=False,
):
    scale = 1.0 / math.sqrt(D) * 1.3
    if layout == "qkv":  # views of a [B, T, 3, H, D] tensor
        assert Tq == Tk and Hq == Hkv
        qkv = torch.randn(B, Tq, 3, Hq, D)
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    elif layout == "tlast":  # stride(-1) != 1: the kernel must copy
        q = torch.randn(B, Hq, D, Tq).transpose(-1, -2)
        k = torch.randn(B, Hkv, D, Tk).transpose(-1, -2)
        v = torch.randn(B, Hkv, Tk, D)
    else:
        q, k, v = torch.randn(B, Hq, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    do = torch.randn(B, Hq, Tq, D)
    keep = keep_mask(B, Hq, Tq, Tk, p, seed, offset) if p > 0 else None
    kw = dict(causal=causal, scale=scale, kpm=kpm, keep=keep, p=p)
    ref = run_ref(q, k, v, do, torch.float64, **kw)
    base = run_ref(q, k, v, do, dtype, **kw) if dtype != torch.float64 else None
    qx, kx, vx, dox = (x.to(dtype) for x in (q, k, v, do))
    if layout != "contig":
        qx, kx, vx = q.to(dtype), k.to(dtype), v.to(dtype)
        if dtype == torch.float32:
            assert not qx.is_contiguous()
    o, lse = OP.attention_fwd(qx, kx, vx, kpm, causal, scale, p, seed, offset)
    assert o.dtype == dtype and o.is_contiguous() and o.shape == q.shape
    assert lse.shape == (B, Hq, Tq)
    dq, dk, dv = OP.attention_bwd(dox, qx, kx, vx, o, lse, kpm, causal, scale, p, seed, offset)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    mine = (o, lse, dq, dk, dv)
    bad = []
    for n, a, r, i in zip(NAMES, mine, ref, range(5), strict=True):
        e = err(a, r)
        eb = err(base[i], r) if base is not None else 0.0
        fin = r[torch.isfinite(r)]
        mag = fin.abs().max().item() if fin.numel() else 1.0
        tol = 2 * eb + FLOOR[dtype] * max(1.0, mag)
        if not e <= tol:
            bad.append(f"{n}: err {e:.3e} > tol {tol:.3e} (torch {dtype} err {eb:.3e})")
        if verbose:
            print(f"    {n}: err {e:.2e} torch-{dtype} err {eb:.2e}")
    desc = (
        f"B={B} Hq={Hq} Hkv={Hkv} Tq={Tq} Tk={Tk} D={D} causal={causal} {dtype} "
        f"mask={kpm is not None} p={p} layout={layout}"
    )
    if bad:
        raise AssertionError(desc + ": " + "; ".join(bad))
    return mine


def kernel_function(causal, scale):
    """The two kernel ops as one autograd.Function (for gradcheck of the float64 path)."""

    class Attn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            o, lse = OP.attention_fwd(q, k, v, None, causal, scale, 0.0, 0, 0)
            ctx.save_for_backward(q, k, v, o, lse)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            return OP.attention_bwd(
                do.contiguous(), q, k, v, o, lse, None, causal, scale, 0.0, 0, 0
            )

    return Attn


def padding_mask(B, Tk, gen):
    m = torch.rand(B, Tk, generator=gen) < 0.3
    m[0] = True  # batch row 0: every key is padding -> out 0, lse +inf, zero grads
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    philox_kat()

    # Long sequence, memory linear in T: a T x T float matrix would be 1 GiB. Run first, so the
    # peak RSS has not already been raised by the other cases.
    T = 16384
    q, k, v, do = (torch.randn(1, 1, T, 64) for _ in range(4))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    o, lse = OP.attention_fwd(q, k, v, None, True, 0.125, 0.0, 0, 0)
    dq, dk, dv = OP.attention_bwd(do, q, k, v, o, lse, None, True, 0.125, 0.0, 0, 0)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    rows = [0, 5000, T - 1]
    qd, kd, vd = q.double(), k.double(), v.double()
    for i in rows:
        s = (qd[0, 0, i] @ kd[0, 0, : i + 1].T) * 0.125
        ref = torch.softmax(s, -1) @ vd[0, 0, : i + 1]
        assert (o[0, 0, i].double() - ref).abs().max() < 1e-5
    assert all(torch.isfinite(x).all() for x in (dq, dk, dv))
    assert grew < 256, f"peak memory grew by {grew:.0f} MiB"
    print(f"T=16384 fwd+bwd: ok, peak RSS grew {grew:.0f} MiB")

    n = 0
    heads = [(1, 1), (4, 4), (8, 2), (8, 1)]
    Ds = [16, 40, 64, 80, 128, 256]
    pairs = [
        (1, 1),
        (17, 17),
        (113, 113),
        (256, 256),
        (17, 113),
        (113, 17),
        (1, 256),
        (256, 1),
        (64, 200),
        (200, 64),
    ]
    # float32: every D x (Tq, Tk) x causal, head layouts and masks rotating through the cases.
    for ci, (D, (Tq, Tk), causal) in enumerate(itertools.product(Ds, pairs, (False, True))):
        if args.quick and ci % 4:
            continue
        Hq, Hkv = heads[ci % len(heads)]
        B = 2
        kpm = padding_mask(B, Tk, gen) if ci % 3 == 1 else None
        check_case(B, Hq, Hkv, Tq, Tk, D, causal, torch.float32, kpm=kpm)
        n += 1
    print(f"float32 shapes: {n} cases ok")

    # Odd head dims (padding to the vector width, micro-kernel column tails), with dropout too.
    for D, causal in itertools.product((1, 3, 200, 255), (False, True)):
        check_case(2, 4, 2, 70, 131, D, causal, torch.float32)
        check_case(1, 2, 1, 50, 33, D, causal, torch.float32, p=0.25, seed=5, offset=1)
        n += 2
    print("odd head dims 1, 3, 200, 255: ok")

    # Every head layout with and without mask, causal both ways, fixed shape.
    for (Hq, Hkv), causal, use_mask in itertools.product(heads, (False, True), (False, True)):
        kpm = padding_mask(3, 113, gen) if use_mask else None
        o, lse, dq, dk, dv = check_case(3, Hq, Hkv, 97, 113, 64, causal, torch.float32, kpm=kpm)
        if use_mask:  # batch row 0 is all padding
            assert (o[0] == 0).all() and torch.isinf(lse[0]).all() and (lse[0] > 0).all()
            assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
        n += 1
    print("head layouts x causal x padding mask (fully padded row -> 0 / +inf / 0 grads): ok")

    # bfloat16.
    for ci, (D, (Tq, Tk), causal) in enumerate(
        itertools.product((16, 64, 80, 256), pairs[:6], (False, True))
    ):
        if args.quick and ci % 3:
            continue
        Hq, Hkv = heads[ci % len(heads)]
        kpm = padding_mask(2, Tk, gen) if ci % 3 == 2 else None
        check_case(2, Hq, Hkv, Tq, Tk, D, causal, torch.bfloat16, kpm=kpm)
        n += 1
    print("bfloat16: ok")

    # float64 (the gradcheck path) including dropout and masks.
    for causal in (False, True):
        check_case(2, 4, 2, 37, 53, 24, causal, torch.float64, kpm=padding_mask(2, 53, gen))
        check_case(2, 4, 1, 53, 37, 24, causal, torch.float64, p=0.2, seed=7, offset=3)
        q, k, v = (
            torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)
        )
        assert torch.autograd.gradcheck(kernel_function(causal, 0.4).apply, (q, k, v))
    print("float64 path (incl. gradcheck): ok")

    # Non-contiguous inputs.
    for dtype, causal in itertools.product((torch.float32, torch.bfloat16), (False, True)):
        check_case(2, 3, 3, 113, 113, 40, causal, dtype, layout="qkv")
        check_case(2, 4, 2, 70, 113, 64, causal, dtype, layout="tlast")
    print("non-contiguous q/k/v: ok")

    # Dropout: gradients vs the reference built with the same Philox mask, and the kernel's own
    # drop fraction read through V = identity (out = dropped P / (1-p) exactly).
    for p, causal, (Hq, Hkv), dtype in itertools.product(
        (0.1, 0.5), (False, True), ((4, 2), (2, 2)), (torch.float32, torch.bfloat16)
    ):
        kpm = padding_mask(2, 150, gen)
        check_case(
            2, Hq, Hkv, 131, 150, 64, causal, dtype, kpm=kpm, p=p, seed=0x1234_5678_9ABC, offset=17
        )
    for p in (0.1, 0.3, 0.7):
        T = 256
        # q = k = 0: uniform P = 1/T, so every kept element of out is 1/(T(1-p)) != 0.
        v = torch.eye(T)[None, None].expand(2, 4, T, T).contiguous()
        zeros = torch.zeros(2, 4, T, T)
        o, _ = OP.attention_fwd(zeros, zeros, v, None, False, 1.0, p, 99, 5)
        frac = (o == 0).double().mean().item()
        assert abs(frac - p) < 0.01, (p, frac)
        km = keep_mask(2, 4, T, T, p, 99, 5)
        assert torch.equal(o != 0, km), "kernel dropout mask differs from the numpy Philox"
        print(f"dropout p={p}: dropped fraction {frac:.4f}, mask identical to numpy Philox")

    # Determinism: two runs bitwise equal (a split backward: few kv groups, many threads' worth).
    for B, Hq, Hkv in ((1, 8, 1), (4, 4, 4)):
        q, k, v, do = (torch.randn(B, Hq if i != 1 and i != 2 else Hkv, 300, 64) for i in range(4))
        r1 = OP.attention_fwd(q, k, v, None, True, 0.125, 0.1, 3, 4)
        g1 = OP.attention_bwd(do, q, k, v, r1[0], r1[1], None, True, 0.125, 0.1, 3, 4)
        r2 = OP.attention_fwd(q, k, v, None, True, 0.125, 0.1, 3, 4)
        g2 = OP.attention_bwd(do, q, k, v, r2[0], r2[1], None, True, 0.125, 0.1, 3, 4)
        assert all(torch.equal(a, b) for a, b in zip(r1 + g1, r2 + g2, strict=True))
    print("determinism: ok")

    # Validation errors.
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    bad = [
        (lambda: OP.attention_fwd(q[0], k, k, None, False, 1.0, 0.0, 0, 0), "4-D"),
        (lambda: OP.attention_fwd(q, k.double(), k, None, False, 1.0, 0.0, 0, 0), "same dtype"),
        (
            lambda: OP.attention_fwd(
                q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), None, False, 1.0, 0.0, 0, 0
            ),
            "multiple",
        ),
        (
            lambda: OP.attention_fwd(
                torch.randn(1, 1, 4, 300),
                torch.randn(1, 1, 4, 300),
                torch.randn(1, 1, 4, 300),
                None,
                False,
                1.0,
                0.0,
                0,
                0,
            ),
            "head dim",
        ),
        (lambda: OP.attention_fwd(q, k, k, torch.zeros(1, 8), False, 1.0, 0.0, 0, 0), "bool"),
        (
            lambda: OP.attention_fwd(
                q, k, k, torch.zeros(1, 7, dtype=torch.bool), False, 1.0, 0.0, 0, 0
            ),
            "shape",
        ),
        (lambda: OP.attention_fwd(q, k, k, None, False, 1.0, 1.0, 0, 0), "dropout_p"),
        (
            lambda: OP.attention_fwd(q.half(), k.half(), k.half(), None, False, 1.0, 0.0, 0, 0),
            "float32",
        ),
        (
            lambda: OP.attention_bwd(
                q, q, k, k, q, torch.zeros(1, 4, 7), None, False, 1.0, 0.0, 0, 0
            ),
            "lse",
        ),
    ]
    for fn, word in bad:
        try:
            fn()
        except RuntimeError as e:
            assert word in str(e), (word, str(e))
        else:
            raise AssertionError(f"no error for case expecting '{word}'")
    print("input validation: ok")

    print(f"ALL OK ({n} shape cases)")


if __name__ == "__main__":
    main()
