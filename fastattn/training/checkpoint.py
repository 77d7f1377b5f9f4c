"""Checkpoints of a training run: written atomically, restored exactly.

A checkpoint holds the model, the optimizer, every RNG state of every rank (torch, CUDA, numpy,
Python and the batch generator), the step, the wall-clock seconds so far, the model config and
the flags. Restoring all of it makes ``--resume`` continue the run bit for bit.

Every file is written to a temporary name in the same directory and renamed over the target
(``os.replace`` is atomic on POSIX and Windows): a crash while saving leaves the previous
checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

CKPT_NAME = "ckpt.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit this run."""


# ----------------------------------------------------------------------------- atomic files
def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text, encoding="utf-8")``, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------------------- RNG states
def seed_all(seed: int, gen: torch.Generator) -> None:
    """Seed torch (dropout), numpy, Python and the batch generator ``gen``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    gen.manual_seed(seed)


def rng_state(gen: torch.Generator, cuda: bool) -> dict:
    """This process's RNG states (CUDA's only when it trains on a GPU)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data": gen.get_state(),
    }


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    """Put back the RNG states that :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["data"])


# ----------------------------------------------------------------------------- save / restore
def save(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rngs: list[dict],
    step: int,
    elapsed_s: float,
    config: dict,
    args: dict,
) -> None:
    """Write a checkpoint atomically. ``rngs``: every rank's :func:`rng_state`, in rank order."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rngs,
        "step": step,
        "elapsed_s": elapsed_s,
        "config": config,
        "args": args,
        "kernels": args.get("kernels"),
    }
    atomic_save(state, path)


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save` (on the CPU; :func:`restore` moves it)."""
    try:
        # weights_only=False: the checkpoint holds numpy / Python RNG states, not only tensors.
        # Only load checkpoints you wrote yourself.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise CheckpointError(f"cannot read the checkpoint {path}: {e}") from e
    need = {"model", "optimizer", "rng", "step", "elapsed_s", "config"}
    if not isinstance(ckpt, dict) or not need <= set(ckpt):
        raise CheckpointError(
            f"{path} is not a fastattn-train checkpoint (expected the keys {sorted(need)})"
        )
    return ckpt


def restore(
    ckpt: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    rank: int = 0,
    world: int = 1,
) -> tuple[int, float]:
    """Load the model, optimizer and this rank's RNG states; returns (step, elapsed_s)."""
    if len(ckpt["rng"]) != world:
        raise CheckpointError(
            f"the checkpoint was written by {len(ckpt['rng'])} process(es), this run has "
            f"{world}; resume with the same number of processes"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][rank], gen)
    return ckpt["step"], ckpt["elapsed_s"]
