"""Training throughput in tokens/s, over the timed iterations only."""

from __future__ import annotations

# Iterations after each (re)start that are not timed: the allocator warms up and torch.compile
# compiles during the first ones, which would otherwise dominate a short run.
TIMING_WARMUP_ITERS = 3


class ThroughputMeter:
    """Adds up the seconds of training iterations, skipping the first ``warmup`` ones.

    Two tallies: the whole run (:attr:`rate`, :attr:`total_s`, :attr:`timed_iters`) and a window
    since the last :meth:`reset_window` (:attr:`window_rate`, reported at each evaluation).
    Evaluation time is never added: the caller times the training step only.
    """

    def __init__(self, tokens_per_iter: int, warmup: int = TIMING_WARMUP_ITERS):
        self.tokens_per_iter = tokens_per_iter
        self.warmup = warmup
        self.seen = 0  # iterations added, timed or not
        self.timed_iters = 0
        self.total_s = 0.0
        self.window_iters = 0
        self.window_s = 0.0
        self.step_s: list[float] = []  # every timed iteration, for the median

    def add(self, seconds: float) -> None:
        """One training iteration took ``seconds``."""
        self.seen += 1
        if self.seen <= self.warmup:
            return
        self.timed_iters += 1
        self.total_s += seconds
        self.step_s.append(seconds)
        self.window_iters += 1
        self.window_s += seconds

    def reset_window(self) -> None:
        self.window_iters, self.window_s = 0, 0.0

    @property
    def rate(self) -> float | None:
        """Tokens/s over every timed iteration; None before the first one."""
        return self.timed_iters * self.tokens_per_iter / self.total_s if self.total_s > 0 else None

    @property
    def window_rate(self) -> float | None:
        """Tokens/s since the last :meth:`reset_window`; None when nothing was timed since."""
        if self.window_s <= 0:
            return None
        return self.window_iters * self.tokens_per_iter / self.window_s

    @property
    def median_ms(self) -> float | None:
        """The median timed iteration in milliseconds (robust to a noisy machine's outliers);
        None before the first one."""
        if not self.step_s:
            return None
        xs = sorted(self.step_s)
        return 1e3 * xs[len(xs) // 2]
