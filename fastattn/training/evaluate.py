"""The loss estimate: mean loss over fixed batches of each split, averaged over ranks."""

from __future__ import annotations

import contextlib

import torch

from fastattn.data import TextDataset
from fastattn.training.dist import Dist

# Evaluation batches are concatenated into forwards of up to this many tokens. At small
# presets one training batch is too small to keep the matmuls busy (cpu_small: 12 x 64 tokens;
# its 20 evaluation batches per split become one forward), while a batch of the default preset
# (64 x 256) already fills a forward on its own and is run alone, as before.
EVAL_TOKENS_PER_FORWARD = 16384


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
    Consecutive batches are stacked into one forward of at most ``EVAL_TOKENS_PER_FORWARD``
    tokens (at least one batch): every batch has the same number of targets, so the mean over
    a stack, weighted by its batch count, is the mean of the batches' losses.
    The model runs in eval mode (no dropout) and is put back in training mode afterwards.
    """
    per_forward = max(1, EVAL_TOKENS_PER_FORWARD // (batch_size * block_size))
    model.eval()
    means = []
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(seed)
        total, left = 0.0, eval_iters
        while left > 0:
            n = min(per_forward, left)
            batches = [
                data.get_batch(split, batch_size, block_size, g, dist.device) for _ in range(n)
            ]
            x, y = (torch.cat([b[k] for b in batches]) for k in (0, 1))
            with autocast:
                total += model(x, y)[1].item() * n
            left -= n
        means.append(total / eval_iters)
    model.train()
    train_loss, val_loss = dist.mean(means)
    return {"train_loss": train_loss, "val_loss": val_loss}
