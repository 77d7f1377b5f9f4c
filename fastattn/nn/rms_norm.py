"""``fastattn.nn.RMSNorm``: a drop-in for :class:`torch.nn.RMSNorm`; and the forwards that
:func:`fastattn.patch` gives Hugging Face's RMSNorm classes."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from fastattn.ops.rms_norm import rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` with its forward served by :func:`fastattn.rms_norm`.

    A subclass, so the constructor (``normalized_shape, eps=None, elementwise_affine=True,
    device=None, dtype=None``), the parameters, the ``state_dict`` keys and
    ``isinstance(m, torch.nn.RMSNorm)`` are those of the torch module; ``load_state_dict`` works
    both ways.
    """

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class _PatchedForward:
    """What the Hugging Face forwards share: the patched class is made at patch time
    (:func:`patched_class`), so a pickle names the original class and the forward instead of
    the made one (``torch.save(model)`` of a patched model loads in a fresh process)."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        cls = type(self)
        base = cls.__dict__.get("_fastattn_rms_base")
        if base is None:
            return super().__reduce_ex__(protocol)
        mixin = next(k for k in cls.__mro__ if k in (LlamaRMSNormForward, GemmaRMSNormForward))
        return (_rebuild, (base, mixin, self.__dict__.copy()))


@functools.cache
def patched_class(base: type, mixin: type) -> type:
    """``base`` with ``mixin``'s forward first: the class :func:`fastattn.patch` gives a module
    of class ``base`` (its constructor, attributes and ``extra_repr`` stay ``base``'s). One per
    base class, so patching twice finds the class it made."""
    new = type(f"Fastattn{base.__name__}", (mixin, base), {"__module__": __name__})
    new._fastattn_rms_base = base  # type: ignore[attr-defined]
    return new


def _rebuild(base: type, mixin: type, state: dict[str, Any]) -> torch.nn.Module:
    cls = patched_class(base, mixin)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


class LlamaRMSNormForward(_PatchedForward):
    """The forward :func:`fastattn.patch` puts on classes whose forward is ``LlamaRMSNorm``'s
    (Llama, Mistral, Qwen2, ...): ``weight * (x * rsqrt(mean(x^2) + eps)).to(input_dtype)``,
    statistics in float32 and the normalised value rounded to the input's dtype before the
    weight multiply (``cast_before_weight``). Mixed in before the original class, so a module
    keeps its class's attributes (``weight``, ``variance_epsilon``), hooks and ``isinstance``.

    Where the weight's dtype differs from the input's, Llama's output has the promoted dtype of
    the two: that call runs the original forward, which keeps that meaning."""

    weight: torch.nn.Parameter
    variance_epsilon: float

    def forward(self, hidden_states: Tensor) -> Tensor:
        w = self.weight
        if w.dtype != hidden_states.dtype or w.dim() != 1:
            return super().forward(hidden_states)  # type: ignore[misc]
        return rms_norm(
            hidden_states, (w.shape[0],), w, self.variance_epsilon, cast_before_weight=True
        )


class GemmaRMSNormForward(_PatchedForward):
    """The forward :func:`fastattn.patch` puts on classes whose forward is ``GemmaRMSNorm``'s
    (Gemma, Gemma2, ...): ``(norm(x.float()) * (1 + weight.float())).type_as(x)``, i.e. one
    rounding at the end and the ``1 + weight`` scale (``weight_offset=1.0``)."""

    weight: torch.nn.Parameter
    eps: float

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.dim() != 1:
            return super().forward(x)  # type: ignore[misc]
        return rms_norm(x, (w.shape[0],), w, self.eps, weight_offset=1.0)
