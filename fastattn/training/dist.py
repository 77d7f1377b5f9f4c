"""Rank and world size of this process, for torchrun / DDP (gloo on CPUs, nccl on GPUs)."""

from __future__ import annotations

import os
from typing import Any

import torch


class Dist:
    """Rank/world of this process; a process group is opened when WORLD_SIZE > 1 (unless the
    caller already opened one: then it is reused and left open)."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.startswith("cuda"):
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
                self.owns_group = True

    @property
    def master(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    def mean(self, values: list[float]) -> list[float]:
        """Average floats over ranks."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
