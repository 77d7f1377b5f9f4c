"""What a run tells its user: the metrics.jsonl file and the tqdm progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastattn.training.checkpoint import atomic_write_text


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """On resume from a checkpoint at ``step``: drop the lines a run wrote after it saved that
    checkpoint (it died later), so the file reads as one run. Rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] < step or (rec["kind"] == "eval" and rec["step"] == step):
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line (``"kind": "iter"`` or ``"eval"``).

    Only rank 0 writes (``enabled=False`` elsewhere makes every method a no-op). With
    ``resume_step`` the file is trimmed to that step and appended to; otherwise it starts empty.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool, resume_step: int | None = None):
        self.file = None
        if not enabled:
            return
        if resume_step is not None:
            trim_metrics(path, resume_step)
        self.file = open(path, "a" if resume_step is not None else "w")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        """Called at each evaluation, so the file is complete up to the last checkpoint."""
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Progress:
    """A tqdm bar over the training steps, with the loss and tokens/s; messages are printed
    above it. Without tqdm (an optional dependency) or with ``show=False`` there is no bar and
    messages go to stdout."""

    def __init__(self, total: int, initial: int, *, show: bool):
        self.bar = None
        if show:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the dev extra installs it; training works without
                pass
            else:
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="it")

    def update(self, loss: float, tokens_per_s: float | None) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}"}
        if tokens_per_s:
            post["tok/s"] = f"{tokens_per_s:,.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
