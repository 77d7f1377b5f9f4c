"""The ahead-of-time Triton check (scripts/triton_aot.py) and the launch rules it compiles.

- Every launch the Triton launchers make (recorded, not run, over dtypes, head dims / row
  lengths, flags, GQA, TF32 on and off) is one of the variants the script compiles: the
  script's table covers what can run on a GPU.
- The autotuned launch runs every candidate config to the same answer (a stand-in tuner: the
  real one needs a GPU driver to time them); fp32 attention with the GPU tiles (not the
  interpreter's) is within the error rule.
- The script fails (exit status 1) on a kernel that does not compile, on spills and on shared
  memory above a target's limit; a good tiny kernel passes. Compiles two tiny kernels (seconds).

Run: pytest tests/test_triton_aot.py
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastattn.triton import TL_TYPES, Launch  # noqa: E402
from fastattn.triton import attention as A  # noqa: E402
from fastattn.triton import gated_act as GA  # noqa: E402
from fastattn.triton import gelu as G  # noqa: E402
from fastattn.triton import layernorm as L  # noqa: E402
from fastattn.triton import rms_norm as RN  # noqa: E402
from fastattn.triton import rotary as RT  # noqa: E402

pytestmark = pytest.mark.triton

_SPEC = importlib.util.spec_from_file_location(
    "triton_aot", os.path.join(os.path.dirname(__file__), "..", "scripts", "triton_aot.py")
)
aot = importlib.util.module_from_spec(_SPEC)
sys.modules["triton_aot"] = aot
_SPEC.loader.exec_module(aot)


def _key(launch: Launch):
    """A launch without its argument order (the recorder sees arguments, not the table's order)."""
    return (
        launch.module,
        launch.kernel,
        frozenset(launch.pointers),
        frozenset(launch.constexprs),
        launch.num_warps,
        launch.num_stages,
    )


def _record(module: str, name: str, args, meta: dict, warps: int, stages: int, arg_names):
    pointers = {
        n: TL_TYPES[str(a.dtype)[6:]]
        for n, a in zip(arg_names, args, strict=False)
        if isinstance(a, torch.Tensor)
    }
    return Launch(module, name, tuple(pointers.items()), (), tuple(meta.items()), warps, stages)


def _arg_names(fn) -> list[str]:
    return list(fn.arg_names)


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kw) records the launch."""

    def __init__(self, module: str, fn, seen: list):
        self.module, self.fn, self.seen = module, fn, seen

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **meta):
            name = self.fn.__name__
            rec = _record(self.module, name, args, meta, num_warps, num_stages, _arg_names(self.fn))
            self.seen.append(rec)

        return launch


@pytest.fixture
def attention_launches(monkeypatch):
    """Records every attention launch as a GPU would make it (real tiles, no interpreter)."""
    seen: list[Launch] = []

    def fake_launch(kernel, configs, grid, args, meta, seq_len):
        # every scalar an i32 (seeds / offsets >= 2^31 would compile i64 variants)
        ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
        assert all(-(2**31) <= a < 2**31 for a in ints), ints
        for cfg in configs:
            rec = _record(
                "attention",
                kernel.__name__,
                args,
                {**meta, **cfg.kwargs},
                cfg.num_warps,
                cfg.num_stages,
                _arg_names(kernel),
            )
            seen.append(rec)

    monkeypatch.setattr(A, "_launch", fake_launch)
    monkeypatch.setattr(A, "_triton_interpreting", lambda: False)
    return seen


def _covered(seen: list[Launch], table: list[Launch]) -> None:
    keys = {_key(lc) for lc in table}
    missing = [lc.label() for lc in seen if _key(lc) not in keys]
    assert seen, "nothing was launched: the recorder is not in the launch path"
    assert not missing, f"launched but not compiled by scripts/triton_aot.py: {missing[:5]}"


@pytest.mark.parametrize("tf32", [False, True])
def test_attention_launches_are_compiled(attention_launches, monkeypatch, tf32):
    monkeypatch.setattr(A, "tf32_enabled", lambda: tf32)
    cases = [  # (Hq, Hkv, D, causal, pad, dropout)
        (2, 2, 1, False, False, 0.0),
        (4, 2, 17, True, True, 0.1),
        (4, 1, 40, False, True, 0.0),
        (2, 2, 64, True, False, 0.2),
        (8, 2, 80, False, False, 0.3),
        (2, 2, 128, True, True, 0.1),
    ]
    for dtype in A.DTYPES:
        for Hq, Hkv, D, causal, pad, p in cases:
            q = torch.zeros(1, Hq, 5, D, dtype=dtype)
            k = torch.zeros(1, Hkv, 7, D, dtype=dtype)
            kpm = torch.zeros(1, 7, dtype=torch.bool) if pad else None
            wr = 0 if causal else -1
            out, lse = A.TRITON.fwd(q, k, k, kpm, None, 1.0, 0.0, -1, wr, 2, p, 2**40 + 7, 2**31)
            A.TRITON.bwd(
                q, q, k, k, out, lse, kpm, None, 1.0, 0.0, -1, wr, 2, p, 2**63 - 1, 5, False
            )
    _covered(attention_launches, A.aot_launches())


@pytest.fixture
def recorded(monkeypatch):
    seen: list[Launch] = []
    for mod, module in (
        (L, "layernorm"),
        (G, "gelu"),
        (GA, "gated_act"),
        (RN, "rms_norm"),
        (RT, "rotary"),
    ):
        for name in dir(mod):
            fn = getattr(mod, name)
            if name.startswith("_") and hasattr(fn, "arg_names"):
                monkeypatch.setattr(mod, name, _Recorder(module, fn, seen))
    return seen


def test_layernorm_launches_are_compiled(recorded):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m in (1, 100, 129, 768, 4099, 8192, 8193, 65536):
            x = torch.zeros(3, m, dtype=dtype)
            for wdt in (dtype, torch.float32):
                w = torch.ones(m, dtype=wdt)
                for weight, bias, res in ((w, w, x), (w, None, None), (None, w, x), (None, None, None)):  # fmt: skip
                    out, s, mean, rstd = L.TRITON.fwd(x, weight, bias, res, 1e-5)
                    for dsum in (None, x):
                        L.TRITON.bwd(x, x, weight, mean, rstd, dsum, True, bias is not None)
    _covered(recorded, L.aot_launches())


def test_gelu_launches_are_compiled(recorded):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m in (1, 3, 64, 100, 1024, 3072):
            x = torch.zeros(5, m, dtype=dtype)
            for bias in (None, torch.zeros(m, dtype=dtype), torch.zeros(m)):
                for approximate in ("none", "tanh"):
                    G.TRITON.fwd(x, bias, approximate)
                    G.TRITON.bwd(x, x, bias, approximate, True)
                    G.TRITON.bwd(x, x, bias, approximate, False)
    _covered(recorded, G.aot_launches())


def test_rms_norm_launches_are_compiled(recorded):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m in (1, 100, 129, 768, 4099, 8192):
            x = torch.zeros(3, m, dtype=dtype)
            for wdt in (dtype, torch.float32):
                w = torch.ones(m, dtype=wdt)
                for weight, res, cast in ((w, x, True), (w, None, False), (None, x, False)):
                    out, s, rstd = RN.TRITON.fwd(x, weight, res, 1e-6, 1.0, cast)
                    for dsum in (None, x):
                        RN.TRITON.bwd(x, x, weight, rstd, dsum, 1.0, cast, weight is not None)
    _covered(recorded, RN.aot_launches())


def test_gated_act_launches_are_compiled(recorded):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for h in (1, 3, 64, 100, 1024, 3072):
            gu = torch.zeros(5, 2 * h, dtype=dtype)
            for act in ("silu", "gelu", "gelu_tanh"):
                for up in (None, gu[:, h:]):
                    gate = gu if up is None else gu[:, :h]
                    GA.TRITON.fwd(gate, up, act)
                    GA.TRITON.bwd(gu[:, :h], gate, up, act)
    _covered(recorded, GA.aot_launches())


def test_rotary_launches_are_compiled(recorded):
    dts = (torch.float32, torch.bfloat16, torch.float16)
    for xd, cd, od in itertools.product(dts, dts, dts):
        if len({d for d in (xd, cd, od) if d != torch.float32}) > 1:
            continue  # one 16-bit type per call
        for d, r in (
            (2, 2),
            (7, 4),
            (8, 8),
            (64, 64),
            (66, 32),
            (128, 128),
            (256, 256),
            (600, 260),
        ):
            contiguous = torch.zeros(2, 3, 5, d, dtype=xd)
            projection = torch.zeros(2, 5, 3, d, dtype=xd).transpose(1, 2)  # heads fastest
            for x in (contiguous, projection):
                cos = torch.zeros(1, 5, r, dtype=cd)
                RT.TRITON.fwd(x, cos, cos, od)
                RT.TRITON.bwd(x, cos, cos, od)
    _covered(recorded, RT.aot_launches())


def test_quick_set_is_a_subset():
    for mod in (A, L, G, GA, RN, RT):
        assert set(mod.aot_launches(False)) <= set(mod.aot_launches(True))


def test_autotuned_launch_runs_every_config(monkeypatch):
    """The autotune path of _launch (GPU only: Triton's autotuner needs a driver to time
    configs) with a stand-in tuner that runs every candidate config: each one gives the answer,
    the key includes the flags, the grid follows each config's blocks."""
    if not A._triton_interpreting():
        pytest.skip("needs the interpreter: the stand-in tuner launches the kernels on the CPU")
    calls = []

    def fake_autotune(configs, key):
        assert key == ["CAUSAL", "HAS_MASK", "DROPOUT"]

        def wrap(kernel):
            class Tuner:
                def __getitem__(self, grid):
                    def run(*args, **meta):
                        out = args[kernel.arg_names.index("O")]  # the forward's output
                        results = []
                        for cfg in configs:
                            out.fill_(float("nan"))  # each config must write all of it
                            kernel[grid(cfg.kwargs)](
                                *args, **meta, **cfg.kwargs, num_warps=cfg.num_warps
                            )
                            results.append(out.clone())
                        calls.append((kernel.__name__, len(configs)))
                        for r in results[1:]:
                            torch.testing.assert_close(r, results[0], rtol=1e-5, atol=1e-6)

                    return run

            return Tuner()

        return wrap

    monkeypatch.setattr(A.triton, "autotune", fake_autotune)
    monkeypatch.setattr(A, "_TUNERS", {})
    monkeypatch.setattr(A, "_INTERPRETER", (A._cfg(32, 32, 4, 1), A._cfg(16, 64, 4, 1)))
    import fastattn
    from fastattn.ops.attention import attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 45, 24, generator=g) for _ in range(3))
    with fastattn.use_backend("triton"):
        out = fastattn.attention(q, k, v, causal=True)
    assert [c[0] for c in calls] == ["_attn_fwd"] and calls[0][1] == 2
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("D", [16, 40, 64, 128])
def test_gpu_tiles_in_the_interpreter(monkeypatch, tf32, D):
    """The fp32 attention kernels with the tiles a GPU would use (not the interpreter's 32 x 32):
    the tables' block sizes, differing per kernel, are correct (causal bounds, masks, edges).
    fp32 only: the interpreter's 16-bit tl.dot is unreliable (see attention._dot)."""
    if not A._triton_interpreting():
        pytest.skip("on a GPU the attention tests run these tiles natively")
    import fastattn
    from tests.test_attention import assert_within_rule, fwd_bwd, make_inputs

    monkeypatch.setattr(A, "_triton_interpreting", lambda: False)
    monkeypatch.setattr(A, "tf32_enabled", lambda: tf32)
    q, k, v, kpm, dout = make_inputs(1, 4, 2, 70, 83, D, torch.float32, pad=True, seed=D)
    kw = dict(causal=True, key_padding_mask=kpm)
    with fastattn.use_backend("triton"):
        got = fwd_bwd(fastattn.attention, q, k, v, dout, **kw)
    if tf32:  # the interpreter multiplies in fp32 whatever the precision: same bound
        assert A.plan(torch.float32, D, causal=True, has_mask=True, dropout=False, tf32=True,
                      interpreter=False)["_attn_fwd"][0]["PRECISION"] == "tf32"  # fmt: skip
    assert_within_rule(got, q, k, v, dout, label=f"gpu tiles D={D}", **kw)


# ----------------------------------------------------------------------------- the script
def _tiny(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)


def _broken(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.dot(tl.load(X + offs), tl.load(X + offs)))  # a 1-D dot: no such thing


def _jit(fn):
    """A compiled-mode JITFunction even under TRITON_INTERPRET=1 (the tests' interpreter)."""
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


tiny_jit = _jit(_tiny)
broken_jit = _jit(_broken)


def _tiny_launch(kernel: str, block: int = 128) -> Launch:
    return Launch(
        module=__name__,
        kernel=kernel,
        pointers=(("X", "fp16"), ("Y", "fp16")),
        floats=(),
        constexprs=(("BLOCK", block),),
        num_warps=4,
        num_stages=1,
    )


def _good_and_broken() -> None:
    """The checks of the test below, run in a fresh interpreter: once the Triton interpreter has
    run kernels in this process it has patched triton.language, and compiling for a GPU target
    here then fails at the first tl call (an order-dependent failure seen in the full suite)."""
    import contextlib
    import io

    good = _tiny_launch("tiny_jit")
    row = aot.compile_one(good, 80)
    assert "error" not in row, row.get("error")
    assert row["regs"] > 0 and row["spill"] == 0 and row["smem"] == 0
    assert aot.problems(row) == []
    assert aot.run([good], [80]) == 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert aot.run([good, _tiny_launch("broken_jit")], [90]) == 1
    assert "broken_jit" in err.getvalue() and "compile error" in err.getvalue()


def test_script_passes_a_good_kernel_and_fails_a_broken_one():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import tests.test_triton_aot as t; t._good_and_broken()"
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_script_fails_on_spills_and_shared_memory():
    lc = _tiny_launch("tiny_jit")
    ok = {"launch": lc, "arch": 80, "regs": 40, "spill": 0, "smem": 166912}
    assert aot.problems(ok) == []
    assert "spills 8 B" in aot.problems({**ok, "spill": 8})[0]
    assert "shared memory" in aot.problems({**ok, "smem": 166913})[0]
    assert aot.problems({**ok, "arch": 90, "smem": 232448}) == []
    assert "sm_90 limit" in aot.problems({**ok, "arch": 90, "smem": 232449})[0]
    # fp32 kernels may spill (reported, not failed); 16-bit ones may not
    for dt, fails in (("fp32", False), ("bf16", True), ("fp16", True)):
        lc = Launch("attention", "_attn_fwd", (("Q", dt),), (), (("PRECISION", "ieee"),), 4, 2)
        assert bool(aot.problems({**ok, "launch": lc, "spill": 100})) == fails, dt
