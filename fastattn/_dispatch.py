"""The one dispatch table: (op, device type, backend) -> implementation.

Nothing else in fastattn branches on backends. Every differentiable op in
``fastattn/ops/<op>.py`` asks :func:`resolve` for an implementation object with
``fwd``/``bwd`` methods and an ``unsupported(**case)`` method that returns ``None`` when it
can serve the case, or a short reason ("head dim 512 > 256") when it cannot.

Backends:

- ``cpu``: C++ kernels in ``csrc/cpu`` (``fastattn._C``), reached through ``torch.ops.fastattn_C``.
- ``cuda``: CUDA C++ kernels in ``csrc/cuda``, same ops, built only where torch has CUDA.
- ``triton``: Triton kernels in ``fastattn/triton``; on a CPU only through the Triton
  interpreter (``TRITON_INTERPRET=1`` set before fastattn is imported), which is for tests.
- ``reference``: plain PyTorch, the ground truth; serves everything.

``auto`` (the default) takes, per device, the first backend in :data:`AUTO_ORDER` that is usable
and supports the case, falling back to ``reference`` (logged once at debug level). An explicitly
chosen backend that cannot serve a call raises :class:`BackendError` naming the case.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger("fastattn")

BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")
OPS = ("layer_norm", "attention", "bias_gelu")

# (op, device type, backend) -> "module:attribute" of the implementation object. Imported lazily
# so that, e.g., triton is never imported unless a Triton kernel is asked for.
TABLE: dict[tuple[str, str, str], str] = {}
for _op, _mod in (
    ("layer_norm", "layernorm"),
    ("attention", "attention"),
    ("bias_gelu", "gelu"),
):
    TABLE[(_op, "cpu", "cpu")] = f"fastattn.ops.{_mod}:NATIVE"
    TABLE[(_op, "cuda", "cuda")] = f"fastattn.ops.{_mod}:NATIVE"
    TABLE[(_op, "cpu", "triton")] = f"fastattn.triton.{_mod}:TRITON"
    TABLE[(_op, "cuda", "triton")] = f"fastattn.triton.{_mod}:TRITON"
    TABLE[(_op, "cpu", "reference")] = f"fastattn.ops.{_mod}:REFERENCE"
    TABLE[(_op, "cuda", "reference")] = f"fastattn.ops.{_mod}:REFERENCE"

# What `auto` tries, in order, per device type. On GPUs Triton comes first: its kernels are the
# ones exercised by the test-suite (through the interpreter) on every machine.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


class BackendError(RuntimeError):
    """An explicitly chosen backend cannot serve a call (not usable here, or case unsupported)."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"fastattn: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}"
        )
    return name


_backend = _check_name(os.environ.get("FASTATTN_BACKEND", "auto").strip().lower() or "auto")
_last: dict[str, str] = {}
_fallback_logged: set[tuple[str, str, str]] = set()
_impl_cache: dict[str, Any] = {}


def get_backend() -> str:
    """The backend in force: ``auto`` unless changed by :func:`set_backend` / :func:`use_backend`."""
    return _backend


def set_backend(name: str) -> None:
    """Choose the backend: ``auto``, ``cpu``, ``triton``, ``cuda`` or ``reference``.

    Process-wide (the autograd engine may run a backward on another thread, and it must see the
    same choice as the forward). The environment variable ``FASTATTN_BACKEND`` sets the initial
    value. A backward is dispatched when it runs, so keep the choice in force until then.
    """
    global _backend
    _backend = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: :func:`set_backend` ``name``, restoring the previous choice on exit."""
    global _backend
    prev = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = prev


def last_backend(op: str) -> str | None:
    """The backend that served the most recent call of ``op`` ("layer_norm", "attention", ...)."""
    return _last.get(op)


# ------------------------------------------------------------------ availability
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


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def unavailable_reason(backend: str, device_type: str) -> str | None:
    """``None`` if ``backend`` can run on ``device_type`` here, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return "the cpu backend runs on CPU tensors only"
        mod, why = _extension()
        if mod is None:
            return why
        cap = getattr(mod, "cpu_capability", "generic")
        flags = _cpu_flags()
        missing = _CAPABILITY_FLAGS.get(cap, set()) - flags
        if flags and missing:
            return f"extension built for {cap} but this CPU lacks {sorted(missing)}; rebuild here"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
        mod, why = _extension()
        if mod is None:
            return why
        if not getattr(mod, "with_cuda", False):
            return "extension built without CUDA kernels (torch had no CUDA at build time)"
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install 'fastattn[triton]')"
        if device_type == "cpu":
            if not _triton_interpreting():
                return (
                    "Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1)"
                )
            return None
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"
        return f"Triton does not run on {device_type} tensors"
    raise ValueError(f"fastattn: unknown backend {backend!r}")


def available_backends(device_type: str | None = None) -> list[str]:
    """Backends usable here, for ``device_type`` ("cpu", "cuda") or for any device."""
    types = [device_type] if device_type else ["cpu", "cuda"]
    out = []
    for b in BACKENDS[1:]:
        if any(unavailable_reason(b, t) is None for t in types):
            out.append(b)
    return out


# ------------------------------------------------------------------ resolution
def _load(key: tuple[str, str, str]) -> Any:
    target = TABLE[key]
    impl = _impl_cache.get(target)
    if impl is None:
        mod_name, attr = target.split(":")
        impl = getattr(importlib.import_module(mod_name), attr)
        _impl_cache[target] = impl
    return impl


def resolve(op: str, device: torch.device, case: Any = None, **facts: Any) -> Any:
    """The implementation of ``op`` for a call on ``device``: ``case`` is the op's typed case
    object (``unsupported(case)``), or the facts are keywords (``unsupported(**facts)``)."""
    dtype = device.type

    def why_not(impl: Any) -> str | None:
        return impl.unsupported(case) if case is not None else impl.unsupported(**facts)

    backend = get_backend()
    if backend == "auto":
        for b in AUTO_ORDER.get(dtype, ("reference",)):
            if (op, dtype, b) not in TABLE or unavailable_reason(b, dtype) is not None:
                continue
            impl = _load((op, dtype, b))
            why = why_not(impl)
            if why is None:
                _last[op] = b
                return impl
            key = (op, dtype, b)
            if key not in _fallback_logged:
                _fallback_logged.add(key)
                log.debug("fastattn: %s on %s: backend %s skipped (%s)", op, dtype, b, why)
        _last[op] = "reference"
        return (
            _load((op, dtype, "reference"))
            if (op, dtype, "reference") in TABLE
            else _load((op, "cpu", "reference"))
        )
    key = (op, dtype, backend)
    if key not in TABLE:
        raise BackendError(f"fastattn: backend {backend!r} has no {op} kernel for {dtype} tensors")
    why = unavailable_reason(backend, dtype)
    if why is not None:
        raise BackendError(f"fastattn: backend {backend!r} is not usable for {op} here: {why}")
    impl = _load(key)
    why = why_not(impl)
    if why is not None:
        raise BackendError(
            f"fastattn: backend {backend!r} does not support {op} with {why}; "
            f"use fastattn.set_backend('auto') to fall back to the reference"
        )
    _last[op] = backend
    return impl


def plan(op: str, device_type: str, case: Any) -> tuple[str, list[tuple[str, str]]]:
    """Which backend would serve ``op`` for ``case`` on ``device_type`` under the backend now in
    force, without running anything: ``(backend, [(skipped backend, why), ...])``. Raises
    :class:`BackendError` where a call would (an explicit backend that cannot serve it)."""
    skipped: list[tuple[str, str]] = []
    backend = get_backend()
    order = AUTO_ORDER.get(device_type, ("reference",)) if backend == "auto" else (backend,)
    for b in order:
        key = (op, device_type, b)
        why = (
            f"no {op} kernel for {device_type} tensors"
            if key not in TABLE
            else unavailable_reason(b, device_type) or _load(key).unsupported(case)
        )
        if why is None:
            return b, skipped
        if backend != "auto":
            raise BackendError(f"fastattn: backend {b!r} cannot serve {op} here: {why}")
        skipped.append((b, why))
    return "reference", skipped


# Load the extension now (if built) so torch.ops.fastattn_C.* exist as soon as fastattn is imported.
_extension()


def describe() -> str:
    """A human-readable report of the version, the build and each backend's status."""
    import fastattn

    lines = [f"fastattn {fastattn.__version__}  (torch {torch.__version__})"]
    mod, why = _extension()
    if mod is not None:
        lines.append(
            f"extension: built for CPU vector width {mod.cpu_capability}, "
            f"CUDA kernels {'included' if mod.with_cuda else 'not built'}"
        )
    else:
        lines.append(f"extension: {why}")
    lines.append(f"backend in force: {get_backend()}  (set_backend() or FASTATTN_BACKEND)")
    for b in BACKENDS[1:]:
        for t in ("cpu", "cuda"):
            why = unavailable_reason(b, t)
            if b == "cpu" and t == "cuda" or b == "cuda" and t == "cpu":
                continue
            lines.append(f"  {b:<9} on {t:<4}: {'usable' if why is None else 'no: ' + why}")
    return "\n".join(lines)
