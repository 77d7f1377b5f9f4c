"""The DESIGN.md error rule: a kernel's error in dtype X against a float64 reference may be at
most twice PyTorch's own error in X (computed the same way), plus a small floor."""

from __future__ import annotations

import torch

# The floor, in units of the dtype's epsilon times the reference's magnitude: it only matters
# where PyTorch's own error happens to be ~0 (e.g. exactly representable results).
FLOOR_EPS = 4.0


def max_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double() - ref64.detach().double()).abs().max().item()


def assert_rule(
    name: str, actual: torch.Tensor, torch_x: torch.Tensor, ref64: torch.Tensor
) -> None:
    """``actual`` (fastattn in dtype X), ``torch_x`` (PyTorch in dtype X), ``ref64`` (float64)."""
    assert actual.shape == ref64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    assert not torch.isnan(actual).any(), f"{name}: NaN in output (an element was not written?)"
    err = max_err(actual, ref64)
    base = max_err(torch_x, ref64)
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    floor = FLOOR_EPS * torch.finfo(actual.dtype).eps * scale
    assert err <= 2 * base + floor, (
        f"{name}: error {err:.3g} > 2 x PyTorch's own error {base:.3g} + floor {floor:.3g}"
    )
