"""Input checks shared by the ops: each raises with what was wrong and what is expected."""

from __future__ import annotations

from torch import Tensor


def check_tensor(op: str, what: str, t: object, *, floating: bool = True) -> None:
    """``t`` must be a tensor; with ``floating``, of a real floating dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(
            f"{op}: {what} must be a floating-point tensor (float32, bfloat16, float16, "
            f"float64), got {t.dtype}"
        )


def check_same_device(op: str, *named: tuple[str, Tensor]) -> None:
    """All the named tensors must live on one device."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                f"all tensors must be on the same device"
            )
