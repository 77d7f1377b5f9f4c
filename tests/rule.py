"""The error rule: a kernel's error in dtype X against a float64 reference may be at
most twice PyTorch's own error in X (computed the same way), plus a small floor."""

from __future__ import annotations

import torch

# The floor, relative to the reference's magnitude: max(4 eps of the dtype, 4e-6). It matters
# only where PyTorch's own error happens to be tiny for the inputs drawn (exactly representable
# results, or a lucky draw: the max error of a few hundred elements fluctuates by several x
# from one random input to the next, and hypothesis hunts for exactly those inputs).
FLOOR_EPS = 4.0
FLOOR_REL = 4e-6


def max_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double() - ref64.detach().double()).abs().max().item()


def assert_rule(
    name: str,
    actual: torch.Tensor,
    torch_x: torch.Tensor,
    ref64: torch.Tensor,
    scale: float | None = None,
) -> None:
    """``actual`` (fastattn in dtype X), ``torch_x`` (PyTorch in dtype X), ``ref64`` (float64).

    ``scale`` sets the floor's magnitude where the result itself can be exactly 0 while the
    quantities it cancels from are not (attention's dq when a query sees one key: a flash
    kernel's dS = P (dP - Delta) leaves a rounding residue the size of dP); by default the
    largest |ref64|."""
    assert actual.shape == ref64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    assert not torch.isnan(actual).any(), f"{name}: NaN in output (an element was not written?)"
    err = max_err(actual, ref64)
    base = max_err(torch_x, ref64)
    if scale is None:
        scale = ref64.abs().max().item() if ref64.numel() else 1.0
    scale = max(1.0, scale)
    floor = max(FLOOR_EPS * torch.finfo(actual.dtype).eps, FLOOR_REL) * scale
    assert err <= 2 * base + floor, (
        f"{name}: error {err:.3g} > 2 x PyTorch's own error {base:.3g} + floor {floor:.3g}"
    )
