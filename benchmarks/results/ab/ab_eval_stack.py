"""The A/B script behind trainer-20261208.md: one evaluation (20 batches per split) at
cpu_small bf16, batch by batch (768 tokens per forward, the old behaviour) against stacked
(16384 tokens per forward), alternating within one process, 9 rounds; prints medians."""

import statistics
import time

from fastattn import train
from fastattn.training import evaluate

argv = ["--preset", "cpu_small", "--dtype", "bfloat16", "--out-dir", "/tmp/ab-eval"]
args, _ = train.parse_args([*argv, "--no-progress"])
run = train.setup(args, train.Dist(args.device))
B, T = args.batch_size, run.config.block_size
for _ in range(20):
    train.train_step(run, B, T)


def once(tokens: int) -> float:
    evaluate.EVAL_TOKENS_PER_FORWARD = tokens
    t0 = time.perf_counter()
    evaluate.estimate_loss(
        run.forward, run.data, batch_size=B, block_size=T, eval_iters=20, seed=7,
        autocast=run.autocast, dist=run.dist,
    )  # fmt: skip
    return time.perf_counter() - t0


res: dict[int, list[float]] = {768: [], 16384: []}
for i in range(9):
    for tokens in (768, 16384) if i % 2 == 0 else (16384, 768):
        res[tokens].append(once(tokens))
print({k: round(1e3 * statistics.median(v), 1) for k, v in res.items()}, "ms per evaluation")
