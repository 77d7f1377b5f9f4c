"""Run the host-emulated CUDA kernels (see run.sh) on CPU tensors against float64 references.

Usage: python drive.py LIB [ln|rms|gelu|gated|rotary|attn|f32|fa2|quick|all] [SEED]. Same cases and error rule as
tests/test_cuda.py (whose helpers it imports).
"""

import ctypes as C
import importlib.util
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from fastattn.ops.attention import dropout_threshold, philox4x32

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("tc", os.path.join(ROOT, "tests", "test_cuda.py"))
tc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tc)
lib = C.CDLL(sys.argv[1])
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
P = lambda t: C.c_void_p(t.data_ptr()) if t is not None else None  # noqa: E731
I64 = C.c_int64
lib.ln_ws.restype = I64
lib.gelu_ws.restype = I64
fails = []


def rule(name, a, t, r):
    try:
        tc.assert_rule(name, a, t, r)
    except AssertionError as e:
        fails.append(str(e))
        print("FAIL", e)


def poison(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def ln(dtype, N, M, affine, residual):
    x = torch.randn(N, M, dtype=torch.float64).mul(2).add(0.5).to(dtype)
    res = torch.randn(N, M).to(dtype) if residual else None
    w = torch.randn(M) if affine else None
    b = torch.randn(M) if affine else None
    out, s = poison(N, M, dtype=dtype), (poison(N, M, dtype=dtype) if residual else None)
    mean, rstd = poison(N, dtype=torch.float32), poison(N, dtype=torch.float32)
    assert (
        lib.ln_fwd(
            DT[dtype],
            P(x),
            P(res),
            P(w),
            P(b),
            P(out),
            P(s),
            P(mean),
            P(rstd),
            I64(N),
            I64(M),
            C.c_float(1e-5),
        )
        == 0
    )
    s_in = s if residual else x
    s64 = s_in.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if affine else None
    b64 = b.double().requires_grad_(True) if affine else None
    ref = F.layer_norm(s64, (M,), w64, b64, 1e-5)
    sx = s_in.clone().requires_grad_(True)
    wx = w.to(dtype).requires_grad_(True) if affine else None
    bx = b.to(dtype).requires_grad_(True) if affine else None
    tx = F.layer_norm(sx, (M,), wx, bx, 1e-5)
    tag = f"ln {dtype} {N}x{M} affine={affine} res={residual}"
    if residual:
        rule(tag + " sum", s, x + res, x.double() + res.double())
    rule(tag + " out", out, tx, ref)
    dout = torch.randn(N, M).to(dtype)
    dsum = torch.randn(N, M).to(dtype) if residual else None
    dx = poison(N, M, dtype=dtype)
    dw = poison(M, dtype=torch.float32) if affine else None
    db = poison(M, dtype=torch.float32) if affine else None
    ws = poison(max(1, lib.ln_ws(I64(N), I64(M), int(affine), int(affine))), dtype=torch.float32)
    assert (
        lib.ln_bwd(
            DT[dtype],
            P(dout),
            P(s_in),
            P(w),
            P(mean),
            P(rstd),
            P(dsum),
            P(dx),
            P(dw),
            P(db),
            P(ws),
            I64(N),
            I64(M),
        )
        == 0
    )
    ins = [t for t in (s64, w64, b64) if t is not None]
    gr = torch.autograd.grad(ref, ins, dout.double())
    gx = torch.autograd.grad(tx, [t for t in (sx, wx, bx) if t is not None], dout)
    rule(
        tag + " dx",
        dx,
        gx[0] + (dsum if residual else 0),
        gr[0] + (dsum.double() if residual else 0),
    )
    if affine:
        rule(tag + " dw", dw.to(dtype), gx[1], gr[1])
        rule(tag + " db", db.to(dtype), gx[2], gr[2])


def rms(dtype, N, M, affine, offset, cast, residual):
    x = torch.randn(N, M, dtype=torch.float64).mul(2).add(0.5).to(dtype)
    res = torch.randn(N, M).to(dtype) if residual else None
    w = torch.randn(M).to(dtype) if affine else None
    c = (w.float() + offset) if affine else None  # the scale the launcher takes
    out, s = poison(N, M, dtype=dtype), (poison(N, M, dtype=dtype) if residual else None)
    rstd = poison(N, dtype=torch.float32)
    eps = 1e-6
    args = (P(x), P(res), P(c), P(out), P(s), P(rstd), I64(N), I64(M), C.c_float(eps), int(cast))
    assert lib.rms_fwd(DT[dtype], *args) == 0
    s_in = s if residual else x
    s64 = s_in.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if affine else None
    ref = tc._rms_math(s64, w64, offset, False, eps)
    sx = s_in.clone().requires_grad_(True)
    wx = w.clone().requires_grad_(True) if affine else None
    tx = tc._rms_math(sx, wx, offset, cast, eps)
    tag = f"rms {dtype} {N}x{M} affine={affine} offset={offset} cast={cast} res={residual}"
    if residual:
        rule(tag + " sum", s, x + res, x.double() + res.double())
    rule(tag + " out", out, tx, ref)
    dout = torch.randn(N, M).to(dtype)
    dsum = torch.randn(N, M).to(dtype) if residual else None
    dx = poison(N, M, dtype=dtype)
    dw = poison(M, dtype=torch.float32) if affine else None
    ws = poison(max(1, lib.rms_ws(I64(N), I64(M), int(affine))), dtype=torch.float32)
    bargs = (P(dout), P(s_in), P(c), P(rstd), P(dsum), P(dx), P(dw), P(ws), I64(N), I64(M))
    assert lib.rms_bwd(DT[dtype], *bargs, int(cast)) == 0
    gr = torch.autograd.grad(ref, [t for t in (s64, w64) if t is not None], dout.double())
    gx = torch.autograd.grad(tx, [t for t in (sx, wx) if t is not None], dout)
    extra = (dsum.double(), dsum) if residual else (0, 0)
    rule(tag + " dx", dx, gx[0] + extra[1], gr[0] + extra[0])
    if affine:
        rule(tag + " dw", dw.to(dtype), gx[1], gr[1])


def gelu(dtype, N, M, approx, with_bias):
    x = (torch.randn(N, M) * 3).to(dtype)
    bias = torch.randn(M).to(dtype) if with_bias else None
    bf = bias.float() if with_bias else None
    out = poison(N, M, dtype=dtype)
    t = int(approx == "tanh")
    assert lib.gelu_fwd(DT[dtype], P(x), P(bf), P(out), I64(N), I64(M), t) == 0
    x64 = x.double().requires_grad_(True)
    b64 = bias.double().requires_grad_(True) if with_bias else None
    ref = F.gelu(x64 + b64 if with_bias else x64, approximate=approx)
    xx = x.clone().requires_grad_(True)
    bx = bias.clone().requires_grad_(True) if with_bias else None
    tx = F.gelu(xx + bx if with_bias else xx, approximate=approx)
    tag = f"gelu {dtype} {N}x{M} {approx} bias={with_bias}"
    rule(tag + " out", out, tx, ref)
    dout = torch.randn(N, M).to(dtype)
    dx = poison(N, M, dtype=dtype)
    db = poison(M, dtype=torch.float32) if with_bias else None
    ws = poison(max(1, lib.gelu_ws(I64(N), I64(M), int(with_bias))), dtype=torch.float32)
    assert (
        lib.gelu_bwd(DT[dtype], P(dout), P(x), P(bf), P(dx), P(db), P(ws), I64(N), I64(M), t) == 0
    )
    gr = torch.autograd.grad(ref, [u for u in (x64, b64) if u is not None], dout.double())
    gx = torch.autograd.grad(tx, [u for u in (xx, bx) if u is not None], dout)
    rule(tag + " dx", dx, gx[0], gr[0])
    if with_bias:
        rule(tag + " db", db.to(dtype), gx[1], gr[1])


def gated(dtype, shape, activation, layout):
    """tests/test_cuda.py's gated_case with the emulated launchers standing in for the ops."""
    code = {"silu": 0, "gelu": 1, "gelu_tanh": 2}[activation]

    def split(gate, up):
        h = gate.shape[1] // 2 if up is None else gate.shape[1]
        return (gate[:, :h], gate[:, h:]) if up is None else (gate, up)

    def fwd(gate, up, act):
        g, u = split(gate, up)
        n, h = g.shape
        out = poison(n, h, dtype=g.dtype)
        rc = lib.gated_fwd(
            DT[g.dtype],
            code,
            P(g),
            I64(g.stride(0)),
            P(u),
            I64(u.stride(0)),
            P(out),
            I64(n),
            I64(h),
        )
        assert rc == 0
        return out

    def bwd(dh, gate, up, act):
        g, u = split(gate, up)
        n, h = g.shape
        if up is None:
            out = poison(n, 2 * h, dtype=g.dtype)
            dg, du, empty = out[:, :h], out[:, h:], torch.empty(0, dtype=g.dtype)
            results = (out, empty)
        else:
            dg, du = poison(n, h, dtype=g.dtype), poison(n, h, dtype=g.dtype)
            results = (dg, du)
        rc = lib.gated_bwd(
            DT[g.dtype], code, P(dh), I64(dh.stride(0)), P(g), I64(g.stride(0)), P(u),
            I64(u.stride(0)), P(dg), P(du), I64(dg.stride(0)), I64(n), I64(h),
        )  # fmt: skip
        assert rc == 0
        return results

    try:
        tc.gated_case(dtype, shape, activation, layout, fwd, bwd, "cpu")
    except AssertionError as e:
        fails.append(f"gated {dtype} {shape} {activation} {layout}: {e}")
        print("FAIL", fails[-1])


def rotary_op(backward):
    """rotary_fwd / rotary_bwd as the binding calls the launcher: the output allocated like x
    (poisoned with NaN, so an element never written shows), cos / sin batch stride 0 when
    Bc == 1."""

    def op(x, cos, sin, out_dtype):
        B, H, T, D = x.shape
        y = torch.empty_like(x, dtype=out_dtype).fill_(float("nan"))
        bc = cos.shape[0] == 1
        cs = (I64 * 4)(0 if bc else cos.stride(0), cos.stride(1), 0 if bc else sin.stride(0),
                       sin.stride(1))  # fmt: skip
        rc = lib.rotary_run(
            int(backward), DT[x.dtype], DT[cos.dtype], DT[out_dtype], P(x),
            (I64 * 3)(*x.stride()[:3]), P(cos), P(sin), cs, P(y), (I64 * 3)(*y.stride()[:3]),
            (I64 * 5)(B, H, T, D, cos.shape[2]),
        )  # fmt: skip
        assert rc == 0, f"rotary_run returned {rc}"
        return y

    return op


def rotary(shape, layout, mix, backward):
    """tests/test_cuda.py's rotary_case with the emulated launcher standing in for the op."""
    try:
        tc.rotary_case(shape, layout, mix, backward, rotary_op(backward), "cpu")
    except AssertionError as e:
        fails.append(f"rotary {'bwd' if backward else 'fwd'} {shape} {layout} {mix}: {e}")
        print("FAIL", fails[-1])


def rotary_refusals():
    """What the launcher refuses (the binding checks first): two 16-bit types, a bad R."""
    x = torch.zeros(1, 1, 2, 8)
    cs = torch.zeros(1, 2, 8)
    y = torch.empty_like(x)
    st3 = (I64 * 3)(*x.stride()[:3])
    cst = (I64 * 4)(0, 8, 0, 8)
    for dts, R in [((1, 2, 0), 8), ((0, 2, 1), 8), ((2, 0, 1), 8), ((0, 0, 0), 7), ((0, 0, 0), 10)]:
        for bwd in (0, 1):
            sh = (I64 * 5)(1, 1, 2, 8, R)
            rc = lib.rotary_run(bwd, *dts, P(x), st3, P(cs), P(cs), cst, P(y), st3, sh)
            if rc == 0:
                fails.append(f"rotary_run accepted dtypes {dts} R={R} bwd={bwd}")
                print("FAIL", fails[-1])


def st(*ts):
    return (I64 * (3 * len(ts)))(*[s for t in ts for s in t.stride()[:3]])


def attn(dtype, case, p, layout, impl=0, backward=True, compare=None, bwd_impl=0, bwd_compare=None):
    """impl / bwd_impl: 0 = attention_fwd / _bwd (the bindings' entries), 1 = the simple kernels,
    2 = the FA2 kernels. compare / bwd_compare: another impl, whose results must be as close to
    this one's as the error rule allows against the reference."""
    B, Hq, Hkv, Tq, Tk, D, causal, padding = case
    if layout == "bthd":
        q = torch.randn(B, Tq, Hq, D).to(dtype).transpose(1, 2)
        k = torch.randn(B, Tk, Hkv, D).to(dtype).transpose(1, 2)
        v = torch.randn(B, Tk, Hkv, D).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, H, T, D).to(dtype) for H, T in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    kpm = None
    if padding:
        kpm = torch.rand(B, Tk) < 0.3
        kpm[0] = True
    scale = 1.0 / math.sqrt(D)
    seed, offset = 0x1234_5678_9ABC, 7
    keep = tc._philox_keep(seed, offset, B, Hq, Tq, Tk, p) if p > 0 else None
    out = poison(B, Hq, Tq, D, dtype=dtype)
    lse = poison(B, Hq, Tq, dtype=torch.float32)
    sh = (C.c_int * 6)(B, Hq, Hkv, Tq, Tk, D)
    mk = kpm.contiguous() if padding else None
    assert (
        lib.attn_fwd(
            impl,
            DT[dtype],
            P(q),
            P(k),
            P(v),
            st(q, k, v),
            P(mk),
            I64(Tk),
            P(out),
            P(lse),
            sh,
            int(causal),
            C.c_float(scale),
            C.c_double(p),
            C.c_uint64(seed),
            C.c_uint64(offset),
        )
        == 0
    )
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref, lse_ref = tc._attn_math(q64, k64, v64, kpm, causal, scale, keep, p)
    qx, kx, vx = (t.clone().requires_grad_(True) for t in (q, k, v))
    tx, _ = tc._attn_math(qx, kx, vx, kpm, causal, scale, keep, p)
    tag = f"attn[{impl}] {dtype} {case} p={p} {layout}"
    rule(tag + " out", out, tx, ref)
    if compare is not None:  # new kernel vs old: both within the rule of the reference
        out2 = poison(B, Hq, Tq, D, dtype=dtype)
        lse2 = poison(B, Hq, Tq, dtype=torch.float32)
        args = (P(q), P(k), P(v), st(q, k, v), P(mk), I64(Tk), P(out2), P(lse2), sh, int(causal))
        fa = (C.c_float(scale), C.c_double(p), C.c_uint64(seed), C.c_uint64(offset))
        assert lib.attn_fwd(compare, DT[dtype], *args, *fa) == 0
        rule(tag + f" out vs impl {compare}", out, out2, ref)
        if not torch.equal(torch.isfinite(lse), torch.isfinite(lse2)):
            fails.append(tag + " lse finiteness vs impl")
    fin = torch.isfinite(lse_ref)
    ok = torch.equal(torch.isfinite(lse), fin) and bool((lse[~fin] > 0).all())
    if ok:
        ok = torch.allclose(lse[fin].double(), lse_ref[fin].detach(), rtol=1e-4, atol=1e-4)
    if not ok:
        fails.append(tag + " lse")
        print("FAIL", tag, "lse")
    if not backward:
        return
    dout = torch.randn(B, Hq, Tq, D).to(dtype)
    dq, dk, dv = (
        poison(B, Hq, Tq, D, dtype=dtype),
        poison(B, Hkv, Tk, D, dtype=dtype),
        poison(B, Hkv, Tk, D, dtype=dtype),
    )
    delta = poison(B, Hq, Tq, dtype=torch.float32)
    assert (
        lib.attn_bwd(
            bwd_impl,
            DT[dtype],
            P(dout),
            P(q),
            P(k),
            P(v),
            P(out),
            P(lse),
            st(dout, q, k, v, out),
            P(mk),
            I64(Tk),
            P(dq),
            P(dk),
            P(dv),
            P(delta),
            sh,
            int(causal),
            C.c_float(scale),
            C.c_double(p),
            C.c_uint64(seed),
            C.c_uint64(offset),
        )
        == 0
    )
    gr = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    gx = torch.autograd.grad(tx, (qx, kx, vx), dout)
    for name, a, t, r in zip(("dq", "dk", "dv"), (dq, dk, dv), gx, gr, strict=True):
        rule(tag + " " + name, a, t, r)
    if bwd_compare is not None:  # the same gradients from the other backward
        g2 = [poison(*x.shape, dtype=dtype) for x in (dq, dk, dv)]
        d2 = poison(B, Hq, Tq, dtype=torch.float32)
        args = [P(dout), P(q), P(k), P(v), P(out), P(lse), st(dout, q, k, v, out), P(mk), I64(Tk)]
        args += [P(x) for x in g2] + [P(d2), sh, int(causal), C.c_float(scale), C.c_double(p)]
        assert (
            lib.attn_bwd(bwd_compare, DT[dtype], *args, C.c_uint64(seed), C.c_uint64(offset)) == 0
        )
        for name, a, t, r in zip(("dq", "dk", "dv"), (dq, dk, dv), g2, gr, strict=True):
            rule(tag + f" {name} vs bwd impl {bwd_compare}", a, t, r)


which = sys.argv[2] if len(sys.argv) > 2 else "all"
torch.manual_seed(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
# quick (make test): the norms and GELU on a few odd shapes per dtype as well (each ~1 s)
QUICK_ROWS = [(1, 1), (7, 33), (5, 1500)]
if which in ("all", "ln", "quick"):
    shapes = QUICK_ROWS if which == "quick" else [(1, 1), (7, 33), (13, 768), (5, 1500), (3, 4104)]
    for dtype in tc.DTYPES:
        for N, M in shapes:
            for affine, residual in [(True, False), (False, False), (True, True)]:
                ln(dtype, N, M, affine, residual)
    print("ln done")
if which in ("all", "rms", "quick"):
    shapes = QUICK_ROWS if which == "quick" else [(1, 1), (7, 33), (13, 768), (5, 1500), (3, 4104)]
    for dtype in tc.DTYPES:
        for N, M in shapes:
            for affine, offset, cast in tc.RMS_MODES:
                for residual in (False, True):
                    rms(dtype, N, M, affine, offset, cast, residual)
    print("rms done")
if which in ("all", "gelu", "quick"):
    shapes = QUICK_ROWS if which == "quick" else [(1, 1), (7, 33), (129, 256), (3, 1001)]
    for dtype in tc.DTYPES:
        for N, M in shapes:
            for approx in ("none", "tanh"):
                for wb in (True, False):
                    gelu(dtype, N, M, approx, wb)
    print("gelu done")
if which in ("all", "gated"):
    for dtype in tc.DTYPES:
        for shape in tc.GATED_SHAPES:
            for activation in tc.GATED_ACTS:
                for layout in tc.GATED_LAYOUTS:
                    gated(dtype, shape, activation, layout)
    print("gated done")
if which in ("all", "rotary", "quick"):
    rotary_refusals()
    for backward in (False, True):
        mixes = tc.ROTARY_MIXES[backward] if which == "quick" else tc.ROTARY_ALL_MIXES
        for c, shape in enumerate(tc.ROTARY_SHAPES):
            for m, mix in enumerate(mixes):
                if which == "quick":  # each shape x mix once, the layouts in turn
                    layouts = [tc.ROTARY_LAYOUTS[(c + m + 2 * backward) % len(tc.ROTARY_LAYOUTS)]]
                else:
                    layouts = tc.ROTARY_LAYOUTS
                for layout in layouts:
                    rotary(shape, layout, mix, backward)
    # More rows than the capped grid covers (4096 blocks of 128 rows at D = 2): the grid-stride
    # loop (~1 s).
    rotary((1, 8, 65537, 2, 2, 1), ("contiguous", "contiguous"), (torch.float32,) * 3, False)
    print("rotary done", flush=True)
if which in ("all", "attn"):
    for dtype in tc.DTYPES:
        for case in tc.CASES:
            for p in (0.0, 0.3):
                for layout in ("contiguous", "bthd"):
                    attn(dtype, case, p, layout)
        print("attn done", dtype, flush=True)
# FA2 kernels (fp16 / bf16), beyond tc.CASES: head dim 256 (forward: Q re-read from shared
# memory, BN = 32; backward: 8 warps, P and dS through shared memory), with GQA + padding and a
# padded 256 (200), and MQA with Tq > Tk over several query blocks.
FA2_CASES = tc.CASES + [
    (1, 2, 1, 70, 140, 256, True, False),
    (2, 4, 2, 45, 67, 200, False, True),
    (2, 2, 1, 129, 64, 128, True, False),
]


def fa2(dtype, case, p, layout, bwd_compare=True):
    """FA2 forward and backward against float64, and against the simple kernels (D <= 128)."""
    old = 1 if case[5] <= 128 else None
    attn(
        dtype,
        case,
        p,
        layout,
        impl=2,
        compare=old,
        bwd_impl=2,
        bwd_compare=old if bwd_compare else None,
    )


def threshold_boundary():
    """Dropout at p just above element (0, 0, 0, 0)'s 24-bit uniform v: the exact threshold
    ceil(p 2^24) = v + 1 drops it, while float32(p) rounds to v 2^-24 and a float compare would
    keep it. Query 0 sees only key 0 (causal), so the one element decides its whole output row."""
    seed, offset = 0x1234_5678_9ABC, 7  # attn()'s
    z = torch.zeros((), dtype=torch.int64)
    v = philox4x32(z, z, z, z + offset, seed)[0].item() >> 8
    p = (v + 0.01) / 2**24
    assert float(np.float32(p)) * 2**24 <= v < dropout_threshold(p)
    case = (1, 1, 1, 8, 8, 16, True, False)
    attn(torch.float16, case, p, "contiguous", impl=2, bwd_impl=2)  # FA2
    attn(torch.float32, case, p, "contiguous")  # the simple kernels
    print("threshold boundary done", flush=True)


if which == "fa2":  # every case x dropout x layout
    for dtype in (torch.float16, torch.bfloat16):
        for case in FA2_CASES:
            for p in (0.0, 0.3):
                for layout in ("contiguous", "bthd"):
                    fa2(dtype, case, p, layout)
        print("fa2 done", dtype, flush=True)
if which == "quick":  # what `make test` runs (tests/test_cuda_emu.py): each case once per dtype
    combos = [(0.0, "contiguous"), (0.3, "bthd"), (0.3, "contiguous"), (0.0, "bthd")]
    for n, dtype in enumerate((torch.float16, torch.bfloat16)):
        for c, case in enumerate(FA2_CASES):
            if n == 0:  # fp16: also against the simple kernels' forward
                fa2(dtype, case, *combos[c % 4], bwd_compare=False)
            else:
                attn(dtype, case, *combos[(c + 2) % 4], impl=2, bwd_impl=2)
        print("fa2 done", dtype, flush=True)
    for c, case in enumerate(tc.CASES[1:3]):  # fp32: the simple kernels, via attention_fwd/_bwd
        attn(torch.float32, case, *combos[c])
    print("attn fp32 done", flush=True)
    threshold_boundary()
if which == "f32":
    for s in range(6):
        torch.manual_seed(100 + s)
        for case in tc.CASES:
            for p in (0.0, 0.3):
                attn(torch.float32, case, p, "contiguous")
print("FAILURES:", len(fails))
sys.exit(1 if fails else 0)
