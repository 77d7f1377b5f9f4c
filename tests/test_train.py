"""The trainer and its data: errors, exact resume, --compare outputs, 2-process DDP (gloo).

Run: PYTHONPATH=. python -m pytest tests/test_train.py -q
"""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings

import numpy as np
import pytest
import torch

from fastattn import train
from fastattn.data import DEFAULT_TEXT, CharTokenizer, DataError, load_text_dataset
from fastattn.models.gpt import GPT, GPTConfig
from fastattn.training import checkpoint
from fastattn.training.compare import compare, write_plot
from fastattn.training.log import trim_metrics
from fastattn.training.meter import ThroughputMeter

pytestmark = pytest.mark.filterwarnings("ignore:fastattn.nn")

TINY_FLAGS = [
    "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
    "--batch-size", "4", "--eval-iters", "2", "--sample-tokens", "0", "--no-progress",
    "--threads", "1", "--dtype", "float32",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """The first 20k characters of tinyshakespeare (fast to prepare)."""
    p = tmp_path_factory.mktemp("data") / "small.txt"
    p.write_text(DEFAULT_TEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return p


def flags(tmp_path, small_text, *extra, out="out"):
    return [*TINY_FLAGS, "--data", str(small_text), "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / out), *extra]  # fmt: skip


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------- data
def test_tokenizer_split_and_cache(tmp_path, small_text):
    ds = load_text_dataset(small_text, tmp_path)
    text = small_text.read_text(encoding="utf-8")
    assert ds.vocab_size == len(set(text))
    assert len(ds.train) == int(0.9 * len(text)) and len(ds.train) + len(ds.val) == len(text)
    assert ds.tokenizer.decode(ds.train[:100]) == text[:100]
    assert ds.tokenizer.decode(ds.val[:50]) == text[len(ds.train) : len(ds.train) + 50]
    assert ds.train.dtype == np.uint16 and isinstance(ds.train, np.memmap)
    vocab = CharTokenizer.load(ds.directory / "vocab.json")
    assert vocab.chars == ds.tokenizer.chars
    assert vocab.decode(vocab.encode("First Citizen")) == "First Citizen"
    mtime = (ds.directory / "train.bin").stat().st_mtime_ns
    again = load_text_dataset(small_text, tmp_path)  # prepared once: files reused
    assert again.directory == ds.directory
    assert (ds.directory / "train.bin").stat().st_mtime_ns == mtime
    assert not [f for f in os.listdir(ds.directory) if f.endswith(".tmp")]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x, y = ds.get_batch("val", 5, 8, g1)
    x2, _ = ds.get_batch("val", 5, 8, g2)
    assert x.shape == (5, 8) and x.dtype == torch.long and torch.equal(x, x2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # each row is the window of the split at the offset the generator draws, y one further
    ix = torch.randint(len(ds.val) - 8, (5,), generator=torch.Generator().manual_seed(1))
    for b, i in enumerate(ix.tolist()):
        assert x[b].tolist() == ds.val[i : i + 8].tolist()
        assert y[b].tolist() == ds.val[i + 1 : i + 9].tolist()
    assert x.is_contiguous() and y.is_contiguous()


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text_dataset(tmp_path / "nope.txt", tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_text_dataset(tmp_path / "empty.txt", tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8.*byte 3"):
        load_text_dataset(tmp_path / "latin1.txt", tmp_path)
    (tmp_path / "short.txt").write_text("abcdefghij" * 10)
    ds = load_text_dataset(tmp_path / "short.txt", tmp_path)  # 90 / 10 tokens
    with pytest.raises(DataError, match="block size 10 is too large.*val split has 10 tokens"):
        ds.get_batch("val", 2, 10, torch.Generator())
    with pytest.raises(DataError, match="not in the vocabulary"):
        ds.tokenizer.encode("xyz")


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-layer", "-1"], "argument --n-layer: must be >= 1, got -1"),
        (["--n-layer", "2.5"], "argument --n-layer: expected an integer, got '2.5'"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--max-iters", "-5"], "argument --max-iters: must be >= 0, got -5"),
        (["--n-embd", "30", "--n-head", "4"], "n_embd (30) must be divisible by n_head (4)"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--dropout", "1.5"], "argument --dropout: must be in [0, 1), got 1.5"),
        (["--beta2", "1"], "argument --beta2: must be in [0, 1), got 1.0"),
        (["--lr", "0"], "argument --lr: must be > 0"),
        (["--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
        (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr (0.1) must be <= --lr (0.01)"),
        (["--grad-clip", "-1"], "argument --grad-clip: must be >= 0, got -1.0"),
        (["--kernels", "cuda"], "invalid choice: 'cuda'"),
        (["--device", "tpu"], "argument --device: must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:x"], "argument --device: must be cpu, cuda or cuda:N"),
        (["--data", "/no/such/file.txt"], "argument --data: file not found: /no/such/file.txt"),
        (["--compare", "--resume"], "--compare and --resume cannot be combined"),
        (["--resume", "--out-dir", "/no/such/dir"], "--resume: no checkpoint at /no/such/dir"),
    ],
)
def test_bad_flags_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_data_files_exit_with_a_message(tmp_path, small_text, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    (tmp_path / "short.txt").write_text("to be or not to be " * 5)  # 95 chars: val has 10
    cases = [
        ("empty.txt", [], "data file is empty"),
        ("bin.txt", [], "not valid UTF-8"),
        ("short.txt", [], "block size 16 is too large for the data: the val split has 10 tokens"),
    ]
    for name, extra, message in cases:
        argv = [*TINY_FLAGS, "--data", str(tmp_path / name), "--cache-dir", str(tmp_path / "c"),
                "--out-dir", str(tmp_path / "o"), "--max-iters", "1", *extra]  # fmt: skip
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert train.build_parser().format_help().count("--") > 30  # every flag has help text


# ----------------------------------------------------------------------------- resume
def test_resume_continues_exactly(tmp_path, small_text):
    """10 steps straight == 5 steps, then --resume to 10: identical losses and weights.
    Dropout is on, so the restored torch RNG state matters too."""
    common = ["--eval-interval", "5", "--log-interval", "1", "--lr-decay-iters", "10",
              "--warmup-iters", "2", "--dropout", "0.1", "--seed", "11"]  # fmt: skip
    train.main(flags(tmp_path, small_text, *common, "--max-iters", "10", out="straight"))
    train.main(flags(tmp_path, small_text, *common, "--max-iters", "5", out="resumed"))
    first = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert first["step"] == 5 and len(first["rng"]) == 1
    assert {"model", "optimizer", "rng", "config", "args", "elapsed_s"} <= set(first)
    assert {"torch", "numpy", "python", "data"} <= set(first["rng"][0])
    train.main(flags(tmp_path, small_text, *common, "--max-iters", "10", "--resume", out="resumed"))

    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    iters = lambda m: [(r["step"], r["loss"]) for r in m if r["kind"] == "iter"]
    evals = lambda m: [
        (r["step"], r["train_loss"], r["val_loss"]) for r in m if r["kind"] == "eval"
    ]
    assert [s for s, _ in iters(a)] == list(range(10))
    assert iters(a) == iters(b)  # exact equality, not a tolerance
    assert evals(a) == evals(b) and [s for s, *_ in evals(a)] == [0, 5, 10]
    sa = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- --compare
def test_compare_writes_table_json_and_plot(tmp_path, small_text, capsys):
    argv = flags(tmp_path, small_text, "--compare", "--max-iters", "6", "--eval-interval", "3",
                 "--sample-tokens", "20", "--no-compare-compile",
                 "--compare-block", "2")  # fmt: skip
    train.main(argv)
    out = capsys.readouterr().out
    assert "speed-up" in out and "tokens/s" in out and "--- sample" in out
    assert "interleaved in blocks of 2" in out
    rec = json.loads((tmp_path / "out" / "compare.json").read_text())
    rows = {r["run"]: r for r in rec["rows"]}
    assert set(rows) == {"torch", "fastattn"} and rows["torch"]["speedup"] == pytest.approx(1.0)
    assert rows["fastattn"]["timed_iters"] == 6 - train.TIMING_WARMUP_ITERS
    assert rows["fastattn"]["step_ms_median"] > 0
    # same seed and config: the two runs learn the same thing
    assert rows["fastattn"]["final_val_loss"] == pytest.approx(
        rows["torch"]["final_val_loss"], rel=1e-4
    )
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    for k in ("torch", "fastattn"):
        assert (tmp_path / "out" / k / "ckpt.pt").exists()
        evals = [r for r in read_metrics(tmp_path / "out" / k / "metrics.jsonl")
                 if r["kind"] == "eval"]  # fmt: skip
        assert len(evals) == 3


def test_compare_interleaves_runs_and_adds_the_compile_row(tmp_path):
    """The runs take turns in blocks; the compile row is there by default."""
    order = []

    class FakeTrainer:
        def __init__(self, args):
            self.args, self.step = args, 0
            self.label = "torch+compile" if args.compile else args.kernels

        @property
        def done(self):
            return self.step >= self.args.max_iters

        def run_until(self, stop):
            order.append((self.label, self.step, min(stop, self.args.max_iters)))
            self.step = min(stop, self.args.max_iters)

        def finish(self):
            tps = {"torch": 1000.0, "torch+compile": 1100.0, "fastattn": 1500.0}[self.label]
            return {"kernels": self.args.kernels, "compile": self.args.compile,
                    "tokens_per_s": tps, "final_val_loss": 2.0, "elapsed_s": 3.0,
                    "timed_iters": 5, "step_ms_median": 10.0,
                    "evals": [{"train_time_s": 1.0, "val_loss": 2.0}]}  # fmt: skip

    args, _ = train.parse_args(["--out-dir", str(tmp_path), "--max-iters", "5",
                                "--compare-block", "2", "--no-progress"])  # fmt: skip
    record = compare(args, FakeTrainer)
    assert order[:3] == [("torch", 0, 2), ("torch+compile", 0, 2), ("fastattn", 0, 2)]
    assert order[-1] == ("fastattn", 4, 5) and len(order) == 9
    assert [r["run"] for r in record["rows"]] == ["torch", "torch+compile", "fastattn"]
    assert [r["speedup"] for r in record["rows"]] == [1.0, 1.1, 1.5]


def test_dtype_auto_probes_and_says_why(capsys):
    from fastattn.training import autodtype

    dtype, why = autodtype.resolve("cpu", 64, 32)
    assert dtype in ("float32", "bfloat16")
    assert "GFLOP/s" in why and dtype in why


# ----------------------------------------------------------------------------- DDP
TINY_CFG = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


def _fixed_batches():
    g = torch.Generator().manual_seed(123)
    x = torch.randint(0, 65, (3, 4, 16), generator=g)  # 3 steps of a global batch of 4
    return x, (7 * x + 3) % 65


def _manual_steps(model, x, y, world=1, rank=0):
    # plain SGD: Adam's g / sqrt(v) would blow float noise on near-zero gradients up to lr
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    n = x.shape[1] // world
    for s in range(x.shape[0]):
        _, loss = model(x[s, rank * n : (rank + 1) * n], y[s, rank * n : (rank + 1) * n])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _ddp_worker(rank, world, port, tmp, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    # 1) DDP on this rank's half of a fixed global batch
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_CFG), kernels="fastattn")
    _manual_steps(DDP(model), *_fixed_batches(), world=world, rank=rank)
    # 2) the trainer end to end (it reuses the open process group)
    summary = train.run(argv)
    torch.save(
        {"manual": model.state_dict(), "trained": summary["model"].state_dict()},
        os.path.join(tmp, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp(tmp_path, small_text):
    import torch.multiprocessing as mp

    argv = flags(tmp_path, small_text, "--max-iters", "4", "--eval-interval", "2")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), argv), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("manual", "trained"):  # replicas stay identical, bit for bit
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), key
    # DDP's gradient averaging == one process on the whole global batch
    torch.manual_seed(0)
    single = GPT(GPTConfig(**TINY_CFG), kernels="fastattn")
    _manual_steps(single, *_fixed_batches())
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["manual"][k], v, rtol=1e-5, atol=1e-6)
    # only rank 0 wrote; the checkpoint holds both ranks' RNG streams
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])
    evals = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]


# ----------------------------------------------------------------------------- the parts
def _tiny_run(seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY_CFG), kernels="torch")
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    return model, opt, gen


def _step(model, opt, gen):
    x = torch.randint(0, 65, (2, 16), generator=gen)
    loss = model(x, x)[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_checkpoint_round_trip(tmp_path):
    """save -> load -> restore into a fresh model: the next steps are bit for bit the same."""
    model, opt, gen = _tiny_run(1)
    _step(model, opt, gen)  # optimizer state exists
    path = tmp_path / checkpoint.CKPT_NAME
    checkpoint.save(path, model=model, optimizer=opt, rngs=[checkpoint.rng_state(gen, False)],
                    step=1, elapsed_s=2.5, config=TINY_CFG, args={"kernels": "torch"})  # fmt: skip
    assert os.listdir(tmp_path) == [checkpoint.CKPT_NAME]  # no temporary file left
    expected = [_step(model, opt, gen) for _ in range(2)]

    model2, opt2, gen2 = _tiny_run(2)  # other weights, other RNG
    ckpt = checkpoint.load(path)
    assert checkpoint.restore(ckpt, model2, opt2, gen2) == (1, 2.5)
    assert [_step(model2, opt2, gen2) for _ in range(2)] == expected
    with pytest.raises(checkpoint.CheckpointError, match="written by 1 process.*this run has 2"):
        checkpoint.restore(ckpt, model2, opt2, gen2, rank=0, world=2)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint whole and no temporary file."""
    path = tmp_path / "ckpt.pt"
    checkpoint.atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, small_text, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read the checkpoint"):
        checkpoint.load(tmp_path / "bad" / "ckpt.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a fastattn-train checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        train.main(flags(tmp_path, small_text, "--resume", out="bad"))
    assert e.value.code == 2 and "cannot read the checkpoint" in capsys.readouterr().err


def test_throughput_meter_skips_warmup_and_windows():
    m = ThroughputMeter(tokens_per_iter=100, warmup=2)
    for s in (9.0, 9.0, 1.0, 1.0):  # the first two are warm-up
        m.add(s)
    assert m.timed_iters == 2 and m.total_s == 2.0 and m.rate == 100.0
    assert m.window_rate == 100.0
    m.reset_window()
    assert m.window_rate is None and m.rate == 100.0
    m.add(0.5)
    assert m.window_rate == 200.0 and m.rate == pytest.approx(300 / 2.5)
    assert ThroughputMeter(10).rate is None


def test_trim_metrics_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"kind": "iter", "step": s} for s in range(6)] + [{"kind": "eval", "step": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    trim_metrics(path, 4)
    assert [(r["kind"], r["step"]) for r in read_metrics(path)] == [
        *(("iter", s) for s in range(4)),
        ("eval", 4),
    ]


def test_compare_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    """No matplotlib: no compare.png, and the output says why instead of 'wrote compare.png'."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rows = [{"kernels": "torch", "tokens_per_s": 1.0}, {"kernels": "fastattn", "tokens_per_s": 2.0}]
    assert not write_plot(tmp_path / "c.png", rows, {"torch": [], "fastattn": []}, "t")
    assert not (tmp_path / "c.png").exists()

    class FakeTrainer:
        def __init__(self, args):
            self.args, self.step = args, 0

        @property
        def done(self):
            return self.step >= self.args.max_iters

        def run_until(self, stop):
            self.step = stop

        def finish(self):
            tps = 1000.0 if self.args.kernels == "torch" else 1500.0
            evals = [{"train_time_s": 1.0, "val_loss": 2.0}]
            return {"tokens_per_s": tps, "final_val_loss": 2.0, "elapsed_s": 3.0,
                    "timed_iters": 5, "evals": evals, "kernels": self.args.kernels}  # fmt: skip

    args, _ = train.parse_args(["--out-dir", str(tmp_path), "--max-iters", "8",
                                "--no-compare-compile", "--no-progress"])  # fmt: skip
    record = compare(args, FakeTrainer)
    out = capsys.readouterr().out
    assert [r["speedup"] for r in record["rows"]] == [1.0, 1.5]
    assert "compare.png" not in out and "matplotlib is not installed" in out
    assert (tmp_path / "compare.json").exists() and not (tmp_path / "compare.png").exists()


@pytest.mark.parametrize("per_forward", [1, 3, 64])
def test_estimate_loss_stacks_batches_without_changing_the_mean(
    tmp_path, small_text, monkeypatch, per_forward
):
    """Evaluation stacks its batches into bigger forwards (EVAL_TOKENS_PER_FORWARD): the result
    must be the mean of the batches' own losses, drawn from the same seeded stream, for every
    stack size (1 batch, a size that does not divide eval_iters, all of them at once)."""
    import contextlib

    from fastattn.training import evaluate
    from fastattn.training.dist import Dist

    B, T, iters, seed = 3, 16, 7, 11
    monkeypatch.setattr(evaluate, "EVAL_TOKENS_PER_FORWARD", per_forward * B * T)
    data = load_text_dataset(small_text, tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY_CFG, "vocab_size": data.vocab_size}), kernels="fastattn")
    model.train()
    got = evaluate.estimate_loss(
        model, data, batch_size=B, block_size=T, eval_iters=iters, seed=seed,
        autocast=contextlib.nullcontext(), dist=Dist("cpu"),
    )  # fmt: skip
    assert model.training  # put back in training mode
    model.eval()
    want = {}
    with torch.no_grad():
        for split in ("train", "val"):
            g = torch.Generator().manual_seed(seed)
            losses = [model(*data.get_batch(split, B, T, g))[1].item() for _ in range(iters)]
            want[f"{split}_loss"] = sum(losses) / iters
    for k in ("train_loss", "val_loss"):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


_MALLOC_PROBE = """
import resource, sys, torch
from fastattn.training.malloc import steady_malloc
note = steady_malloc() if sys.argv[1] == "steady" else "system"
def once():
    ts = [torch.empty(1 << 18).fill_(1.0) for _ in range(64)]  # 64 x 1 MiB, touched
    del ts
once()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
once()
print(note, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_steady_malloc_reuses_freed_memory():
    """--malloc steady (the trainer's default): a second round of the same allocations takes
    a fraction of the page faults it takes with glibc's defaults, which hand the freed memory
    back and fault it in again (~16K faults for 64 MiB). Subprocesses: the setting is
    process-wide."""
    import subprocess

    out = {}
    for mode in ("system", "steady"):
        r = subprocess.run(
            [sys.executable, "-c", _MALLOC_PROBE, mode], capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip
        note, faults = r.stdout.strip().rsplit(" ", 1)
        out[mode] = (note, int(faults))
    if out["steady"][0] == "None":
        pytest.skip("not glibc: steady_malloc changes nothing")
    assert "mmap threshold 32 MiB" in out["steady"][0]
    assert out["system"][1] > 8000, out  # the defaults return the 64 MiB (the probe can fail)
    # a few hundred to ~2K faults remain in steady (the kernel reclaiming idle heap pages)
    assert out["steady"][1] < out["system"][1] / 4, out


def test_malloc_steady_says_when_it_cannot_apply(monkeypatch, capsys, tmp_path, small_text):
    """Off glibc --malloc steady changes nothing: the start-up lines say so instead of
    staying silent."""
    monkeypatch.setattr(train, "steady_malloc", lambda: None)
    train.run(flags(tmp_path, small_text, "--max-iters", "1"))
    assert "--malloc steady has no effect here (not glibc)" in capsys.readouterr().out
