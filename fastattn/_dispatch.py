"""The one registry: backends as objects, ops as declarations, and the dispatch derived from both.

Nothing else in fastattn branches on backends. The pieces:

- :class:`Backend` -- ``cpu`` (C++ kernels in ``csrc/cpu``, ``fastattn._C``), ``cuda`` (CUDA C++ in
  ``csrc/cuda``, built where torch has CUDA), ``triton`` (``fastattn/triton``; on a CPU only through
  the Triton interpreter, for tests) and ``reference`` (plain PyTorch, serves everything): a name,
  the device types it runs on, and why it is unusable here (or ``None``).
- :class:`OpDecl` -- one per op, declared in ``fastattn/ops/<op>.py`` with :func:`declare`: its
  file stem, its typed case class, and per (backend, device type) a :class:`Support` (dtypes,
  limits, optional features). The dispatch table, the limit checks and ``python -m fastattn``'s
  report are derived from these declarations. Limits of the C++ / CUDA kernels are read from the
  extension (``fastattn._C.limits``, from ``csrc/kernel_limits.h``), so they are stated once.
- :func:`resolve` -- the implementation object (``fwd`` / ``bwd``) for a call's case. ``auto``
  (the default) takes, per device, the first usable backend of :data:`AUTO_ORDER` whose support
  covers the case, else ``reference`` (logged once at debug level). An explicitly chosen backend
  that cannot serve a call raises :class:`BackendError` naming the case.

Backend choice: :func:`set_backend` sets the process-wide default (``FASTATTN_BACKEND`` its initial
value); :func:`use_backend` overrides it for the current thread only, so threads nest it
independently. The backward of a call runs on the choice in force at its forward (the custom ops
carry it), whichever thread autograd runs it on. The life of a call, and how to add an op or a
backend: ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("fastattn")


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot serve a call (not usable here, or case unsupported)."""


# ------------------------------------------------------------------ the extension
@functools.cache
def _extension() -> tuple[Any | None, str | None]:
    try:
        from fastattn import _C  # noqa: F401  (loading it registers torch.ops.fastattn_C)
    except ImportError as e:
        return (
            None,
            f"extension fastattn._C not built ({e}); run `pip install --no-build-isolation -e .`",
        )
    return _C, None


def native_limit(name: str) -> int | None:
    """A limit the C++ / CUDA kernels enforce (``csrc/kernel_limits.h``), or None without the extension."""
    mod, _ = _extension()
    limits = getattr(mod, "limits", None) or {}
    return limits.get(name)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_CAPABILITY_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx2": {"avx2", "fma"},
    "generic": set(),
}


# ------------------------------------------------------------------ backends
@dataclass(frozen=True)
class Backend:
    """A family of implementations: where it runs and whether it can run here."""

    name: str
    device_types: tuple[str, ...]
    summary: str
    why_unusable: Callable[[str], str | None] = field(repr=False)

    def unavailable(self, device_type: str) -> str | None:
        """None if this backend can run on ``device_type`` tensors here, else why not."""
        if device_type not in self.device_types:
            return f"the {self.name} backend runs on {'/'.join(self.device_types)} tensors only"
        return self.why_unusable(device_type)


def _cpu_unusable(device_type: str) -> str | None:
    mod, why = _extension()
    if mod is None:
        return why
    cap = getattr(mod, "cpu_capability", "generic")
    flags = _cpu_flags()
    missing = _CAPABILITY_FLAGS.get(cap, set()) - flags
    if flags and missing:
        return f"extension built for {cap} but this CPU lacks {sorted(missing)}; rebuild here"
    return None


def _cuda_unusable(device_type: str) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    mod, why = _extension()
    if mod is None:
        return why
    if not getattr(mod, "with_cuda", False):
        return "extension built without CUDA kernels (torch had no CUDA at build time)"
    return None


def _triton_unusable(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'fastattn[triton]')"
    from fastattn.triton import interpreting

    if device_type == "cpu" and not interpreting():
        return "Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cpu", ("cpu",), "C++ kernels (csrc/cpu), AVX-512 / AVX2 / generic", _cpu_unusable),
        Backend("triton", ("cuda", "cpu"), "Triton kernels (fastattn/triton)", _triton_unusable),
        Backend("cuda", ("cuda",), "CUDA C++ kernels (csrc/cuda)", _cuda_unusable),
        Backend("reference", ("cpu", "cuda"), "plain PyTorch, the ground truth", lambda d: None),
    )
}
BACKEND_NAMES = ("auto", *BACKENDS)

# What `auto` tries, in order, per device type. On GPUs Triton comes first: its kernels are the
# ones exercised by the test-suite (through the interpreter) on every machine.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


@functools.cache
def unavailable_reason(backend: str, device_type: str) -> str | None:
    """``None`` if ``backend`` can run on ``device_type`` here, else why not."""
    if backend not in BACKENDS:
        raise ValueError(f"fastattn: unknown backend {backend!r}")
    return BACKENDS[backend].unavailable(device_type)


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends usable here, for ``device_type`` ("cpu", "cuda") or for any device."""
    types = [device_type] if device_type else ["cpu", "cuda"]
    return [b for b in BACKENDS if any(unavailable_reason(b, t) is None for t in types)]


# ------------------------------------------------------------------ op declarations
@dataclass(frozen=True)
class Support:
    """What one backend's kernel for one op serves on one device type.

    ``max_head_dim`` / ``max_cols`` bound the case's ``head_dim`` / ``cols``;
    ``dtype_max_head_dim`` overrides ``max_head_dim`` for the dtypes it names (the CUDA
    attention: fp16 / bf16 to 256, fp32 to 128); ``features`` are the optional features (the
    case's ``features()``) it serves. A limit given as a string is read from the extension's
    ``limits`` (``csrc/kernel_limits.h``) when checked.
    """

    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | str | None = None
    max_cols: int | str | None = None
    features: frozenset[str] | None = frozenset()  # None: every feature (the reference)
    dtype_max_head_dim: tuple[tuple[torch.dtype, int | str], ...] = ()

    @staticmethod
    def _limit(value: int | str | None) -> int | None:
        return native_limit(value) if isinstance(value, str) else value

    def head_dim_limit(self, dtype: torch.dtype) -> int | None:
        """The largest head dim served in ``dtype`` (None: no limit)."""
        return self._limit(dict(self.dtype_max_head_dim).get(dtype, self.max_head_dim))

    def unsupported(self, case: Any) -> str | None:
        """None if this covers ``case``, else a short reason naming what does not fit."""
        if case.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"dtype {case.dtype} (takes {names})"
        for what, attr, limit in (
            ("head dim", "head_dim", self.head_dim_limit(case.dtype)),
            ("row length", "cols", self._limit(self.max_cols)),
        ):
            if limit is not None and getattr(case, attr, 0) > limit:
                in_dtype = (
                    f" in {case.dtype}" if attr == "head_dim" and self.dtype_max_head_dim else ""
                )
                return f"{what} {getattr(case, attr)} > {limit}{in_dtype}"
        missing = []
        if self.features is not None and hasattr(case, "features"):
            missing = sorted(set(case.features()) - self.features)
        if missing:
            words = getattr(case, "FEATURE_WORDS", {})
            return ", ".join(words.get(f, f) for f in missing)
        return None

    def describe(self) -> str:
        parts = ["/".join(str(d).removeprefix("torch.") for d in self.dtypes)]
        for what, value in (("head dim", self.max_head_dim), ("cols", self.max_cols)):
            limit = self._limit(value)
            if limit is not None:
                parts.append(f"{what} <= {limit}")
        for dtype, value in self.dtype_max_head_dim:
            parts.append(f"({str(dtype).removeprefix('torch.')}: head dim <= {self._limit(value)})")
        if self.features:
            parts.append("+" + ",".join(sorted(self.features)))
        return " ".join(parts)


@dataclass(frozen=True)
class OpDecl:
    """An op: its name, the file stem its implementations live in, its case class, and per
    ``(backend, device_type)`` what that backend's kernel serves (absent: no kernel)."""

    name: str
    file: str
    case: type
    support: dict[tuple[str, str], Support]
    summary: str = ""

    def impl_path(self, backend: str) -> str:
        """Where the implementation object lives: the same name in every folder."""
        if backend == "triton":
            return f"fastattn.triton.{self.file}:TRITON"
        if backend == "reference":
            return f"fastattn.ops.{self.file}:REFERENCE"
        return f"fastattn.ops.{self.file}:NATIVE"  # cpu and cuda: torch.ops.fastattn_C.<op>_*


OPS: dict[str, OpDecl] = {}
REFERENCE_SUPPORT = Support(
    dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), features=None
)


def declare(decl: OpDecl) -> OpDecl:
    """Register an op. The reference backend serves every case on every device."""
    support = dict(decl.support)
    for dev in BACKENDS["reference"].device_types:
        support.setdefault(("reference", dev), REFERENCE_SUPPORT)
    decl = OpDecl(decl.name, decl.file, decl.case, support, decl.summary)
    OPS[decl.name] = decl
    return decl


# ------------------------------------------------------------------ backend choice
_default = "auto"
_local = threading.local()  # .override: the use_backend() stack top of this thread
_last: dict[str, str] = {}
_fallback_logged: set[tuple[str, str, str]] = set()
_impl_cache: dict[str, Any] = {}


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"fastattn: unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}"
        )
    return name


_default = _check_name(os.environ.get("FASTATTN_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The backend in force in this thread: its :func:`use_backend`, else the process default."""
    return getattr(_local, "override", None) or _default


def set_backend(name: str) -> None:
    """Choose the process-wide default backend: ``auto``, ``cpu``, ``triton``, ``cuda`` or
    ``reference`` (``FASTATTN_BACKEND`` sets the initial value). A thread inside
    :func:`use_backend` keeps its own choice."""
    global _default
    _default = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ``name`` is the backend for calls made by this thread inside the block
    (and for their backward passes, wherever autograd runs them); other threads are unaffected."""
    prev = getattr(_local, "override", None)
    _local.override = _check_name(name)
    try:
        yield
    finally:
        _local.override = prev


def last_backend(op: str) -> str | None:
    """The backend that served the most recent call of ``op`` ("layer_norm", "attention", ...)."""
    return _last.get(op)


# ------------------------------------------------------------------ resolution
def _load(decl: OpDecl, backend: str) -> Any:
    target = decl.impl_path(backend)
    impl = _impl_cache.get(target)
    if impl is None:
        mod_name, attr = target.split(":")
        impl = getattr(importlib.import_module(mod_name), attr)
        _impl_cache[target] = impl
    return impl


def _why_not(decl: OpDecl, backend: str, device_type: str, case: Any) -> str | None:
    support = decl.support.get((backend, device_type))
    if support is None:
        return f"no {decl.name} kernel for {device_type} tensors"
    why = unavailable_reason(backend, device_type) or support.unsupported(case)
    if why is None:
        extra = getattr(_load(decl, backend), "unsupported", None)
        why = extra(case) if extra is not None else None
    return why


def plan(
    op: str, device_type: str, case: Any, backend: str | None = None
) -> tuple[str, list[tuple[str, str]]]:
    """Which backend would serve ``op`` for ``case`` on ``device_type``, without running it:
    ``(backend, [(skipped backend, why), ...])``. ``backend`` defaults to the one in force.
    Raises :class:`BackendError` where a call would (an explicit backend that cannot serve it)."""
    chosen = get_backend() if backend is None else _check_name(backend)
    return _plan(op, device_type, case, chosen)


@functools.lru_cache(maxsize=4096)
def _plan(op: str, device_type: str, case: Any, chosen: str) -> tuple[str, list[tuple[str, str]]]:
    """:func:`plan` for a named choice. Cached: cases are frozen dataclasses, and nothing it
    reads changes while the process runs (availability is cached too), so a call's dispatch
    costs one dict lookup."""
    decl = OPS[op]
    if chosen != "auto":
        why = _why_not(decl, chosen, device_type, case)
        if why is not None:
            raise BackendError(
                f"fastattn: backend {chosen!r} cannot serve {op} here: {why}; "
                f"use fastattn.set_backend('auto') to fall back to the reference"
            )
        return chosen, []
    skipped: list[tuple[str, str]] = []
    for b in AUTO_ORDER.get(device_type, ("reference",)):
        why = _why_not(decl, b, device_type, case)
        if why is None:
            return b, skipped
        skipped.append((b, why))
    return "reference", skipped


def resolve(op: str, device: torch.device, case: Any, backend: str | None = None) -> Any:
    """The implementation object of ``op`` for a call on ``device`` with the given case."""
    dev = device.type
    chosen, skipped = plan(op, dev, case, backend)
    for b, why in skipped:
        if (op, dev, b) not in _fallback_logged:
            _fallback_logged.add((op, dev, b))
            log.debug("fastattn: %s on %s: backend %s skipped (%s)", op, dev, b, why)
    _last[op] = chosen
    return _load(OPS[op], chosen)


_cpu_eager: dict[tuple, bool] = {}


def cpu_serves(op: str, key: tuple, make_case: Callable[[], Any]) -> bool:
    """Whether the backend in force resolves this CPU call of ``op`` to the ``cpu`` backend:
    the test of the C++ eager path (``csrc/autograd.cpp``), which calls the CPU kernels itself.
    ``key``: the call's case facts as a tuple, ``make_case`` builds the case on a miss; the
    answer is cached per (op, backend in force, key), so a hit costs one dict lookup. A miss
    raises :class:`BackendError` as :func:`plan` does. Records the call for
    :func:`last_backend` when it answers True."""
    chosen = get_backend()
    k = (op, chosen, key)
    hit = _cpu_eager.get(k)
    if hit is None:
        hit = _cpu_eager[k] = _plan(op, "cpu", make_case(), _check_name(chosen))[0] == "cpu"
    if hit:
        _last[op] = "cpu"
    return hit


def run(op: str, stage: str, device: torch.device, case: Any, backend: str, *args: Any) -> Any:
    """``resolve(...).<stage>(*args)``: the body of every custom op (``stage`` "fwd" / "bwd")."""
    return getattr(resolve(op, device, case, backend), stage)(*args)


# ------------------------------------------------------------------ the report
def describe() -> str:
    """A human-readable report of the version, the build, each backend and each op's support."""
    import fastattn

    lines = [f"fastattn {fastattn.__version__}  (torch {torch.__version__})"]
    mod, why = _extension()
    if mod is not None:
        lines.append(
            f"extension: built for CPU vector width {mod.cpu_capability}, "
            f"CUDA kernels {'included' if mod.with_cuda else 'not built'}"
        )
        if getattr(mod, "cpu_bf16_dot", False):
            on = os.environ.get("FASTATTN_CPU_BF16_DOT") != "0"
            lines.append(
                "cpu bfloat16 attention: "
                + ("AVX512_BF16 dot products" if on else "fp32 FMA (FASTATTN_CPU_BF16_DOT=0)")
            )
        else:
            lines.append("cpu bfloat16 attention: fp32 FMA (no AVX512_BF16 in this build or CPU)")
        if getattr(mod, "cpu_bf16_cvt", False):
            lines.append("cpu float -> bfloat16 stores: AVX512_BF16 vcvtneps2bf16")
        else:
            why_not = (
                "FASTATTN_CPU_BF16_CVT=0"
                if os.environ.get("FASTATTN_CPU_BF16_CVT") == "0"
                else "no AVX512_BF16 in this build or CPU"
            )
            lines.append(f"cpu float -> bfloat16 stores: emulated rounding ({why_not})")
    else:
        lines.append(f"extension: {why}")
    lines.append(f"backend in force: {get_backend()}  (set_backend() or FASTATTN_BACKEND)")
    lines.append("backends:")
    for b in BACKENDS.values():
        for t in b.device_types:
            why = unavailable_reason(b.name, t)
            state = "usable" if why is None else "no: " + why
            lines.append(f"  {b.name:<9} on {t:<4}: {state}")
    lines.append("ops (what each backend's kernel serves):")
    for decl in OPS.values():
        lines.append(f"  {decl.name}: {decl.summary}")
        for (b, t), s in decl.support.items():
            if b != "reference":
                lines.append(f"    {b:<9} {t:<4} {s.describe()}")
    return "\n".join(lines)


# Load the extension now (if built) so torch.ops.fastattn_C.* exist as soon as fastattn is imported.
_extension()
