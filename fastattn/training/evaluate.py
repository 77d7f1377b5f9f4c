"""The loss estimate: mean loss over fixed batches of each split, averaged over ranks."""

from __future__ import annotations

import contextlib

import torch

from fastattn.data import TextDataset
from fastattn.training.dist import Dist


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    data: TextDataset,
    *,
    batch_size: int,
    block_size: int,
    eval_iters: int,
    seed: int,
    autocast: contextlib.AbstractContextManager,
    dist: Dist,
) -> dict[str, float]:
    """``{"train_loss", "val_loss"}``: the mean loss over ``eval_iters`` batches per split.

    The batches come from a generator seeded with ``seed`` at every call, so every evaluation of
    a run (and of a resumed run) sees the same batches and the numbers compare across steps.
    The model runs in eval mode (no dropout) and is put back in training mode afterwards.
    """
    model.eval()
    means = []
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(eval_iters):
            x, y = data.get_batch(split, batch_size, block_size, g, dist.device)
            with autocast:
                total += model(x, y)[1].item()
        means.append(total / eval_iters)
    model.train()
    train_loss, val_loss = dist.mean(means)
    return {"train_loss": train_loss, "val_loss": val_loss}
