"""The demo trainer's parts, one job per module; ``fastattn/train.py`` holds the CLI and the loop.

- :mod:`.dist`: rank/world of this process (torchrun), averaging and gathering over ranks.
- :mod:`.checkpoint`: atomic saves, RNG states, save/restore of a run.
- :mod:`.evaluate`: the train/val loss estimate on fixed batches.
- :mod:`.meter`: training throughput (tokens/s) without warm-up and evaluation time.
- :mod:`.log`: the metrics.jsonl file and the tqdm progress bar.
- :mod:`.compare`: ``--compare``: torch vs fastattn kernels, table, JSON and plot.
"""
