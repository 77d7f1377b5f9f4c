"""The A/B script behind trainer-20261208.md: the trainer's cpu_small bf16 step, wall clock.

``python ab_trainer_step.py steady|system``: a fresh process per run (the malloc setting is
process-wide and set once); 20 warm-up steps, then 8 blocks of 25 steps; prints wall and
process CPU ms per step of each block, then the kernel (system) CPU time and the minor page
faults per step over all 200 steps. Run the two settings alternately.
"""

import resource
import sys
import time

from fastattn import train

argv = ["--preset", "cpu_small", "--dtype", "bfloat16", "--out-dir", "/tmp/ab-trainer"]
args, _ = train.parse_args([*argv, "--no-progress", "--malloc", sys.argv[1]])
run = train.setup(args, train.Dist(args.device))
B, T = args.batch_size, run.config.block_size
for _ in range(20):
    train.train_step(run, B, T)
blocks = []
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(8):
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(25):
        train.train_step(run, B, T)
    wall, cpu = (time.perf_counter() - t0) / 25, (time.process_time() - c0) / 25
    blocks.append((round(1e3 * wall, 1), round(1e3 * cpu, 1)))
r1 = resource.getrusage(resource.RUSAGE_SELF)
sys_ms = 1e3 * (r1.ru_stime - r0.ru_stime) / 200
faults = (r1.ru_minflt - r0.ru_minflt) / 200
print(sys.argv[1], "wall/cpu ms per step per block:", blocks)
print(f"{sys.argv[1]} system CPU {sys_ms:.2f} ms/step (both threads), {faults:.0f} faults/step")
