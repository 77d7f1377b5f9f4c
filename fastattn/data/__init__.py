"""Character-level text data for the demo GPT: tokenizer, 90/10 split, uint16 token files.

``load_text_dataset(path=None, cache_dir=None)`` reads a UTF-8 text file (default: the bundled
tinyshakespeare), builds a character vocabulary, splits the tokens 90/10 into train/val and
writes ``train.bin`` / ``val.bin`` (uint16) and ``vocab.json`` once into
``<cache_dir>/<name>-<hash>/`` (default cache dir: ``$XDG_CACHE_HOME/fastattn`` or
``~/.cache/fastattn``; the hash is of the file's bytes, so an edited file gets a fresh
directory). Files are written atomically (temp file + ``os.replace``), so concurrent
preparations (e.g. several ranks) are safe. The token files are then memory-mapped with numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_TEXT = Path(__file__).with_name("tinyshakespeare.txt")
_FORMAT = 1  # bump when the on-disk layout changes


class DataError(ValueError):
    """A data file or request that cannot be used; the message says what and why."""


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of the text."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        try:
            return [self.stoi[c] for c in s]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write(Path(path), json.dumps({"chars": self.chars}, ensure_ascii=False).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["chars"])


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastattn"


def read_text(path: str | os.PathLike) -> tuple[str, bytes]:
    """The text of a UTF-8 file and its raw bytes, or a :class:`DataError` that says why not."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if not p.is_file():
        raise DataError(f"data path is not a regular file: {p}")
    raw = p.read_bytes()
    if not raw:
        raise DataError(f"data file is empty: {p}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file is not valid UTF-8 text: {p} (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None
    return text, raw


@dataclass
class TextDataset:
    """Train/val token streams (uint16 memmaps) and their tokenizer."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: CharTokenizer
    directory: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f'split must be "train" or "val", got {name!r}')
        return self.train if name == "train" else self.val

    def check_block_size(self, block_size: int) -> None:
        for name in ("train", "val"):
            n = len(self.split(name))
            if block_size >= n:
                raise DataError(
                    f"block size {block_size} is too large for the data: the {name} split has "
                    f"{n} tokens and needs at least block_size + 1 = {block_size + 1} "
                    f"(use a smaller --block-size or a longer text)"
                )

    def get_batch(
        self,
        split: str,
        batch_size: int,
        block_size: int,
        generator: torch.Generator,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of the split: x, y (batch_size, block_size) int64, y = x shifted by
        one. The start offsets come from ``generator`` (a CPU torch.Generator), so a saved
        generator state replays the same batches."""
        data = self.split(split)
        self.check_block_size(block_size)
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
        # One fancy-index gather per tensor (not a Python loop of slices and a stack: 6x faster
        # at batch 12, which a 25 ms training step notices); the same windows either way.
        idx = ix[:, None] + np.arange(block_size)
        x = torch.from_numpy(data[idx].astype(np.int64))
        y = torch.from_numpy(data[idx + 1].astype(np.int64))
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
                device, non_blocking=True
            )
        return x.to(device), y.to(device)


def load_text_dataset(
    path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> TextDataset:
    """Prepare (once) and memory-map the character-level dataset of a UTF-8 text file."""
    path = Path(path) if path is not None else DEFAULT_TEXT
    text, raw = read_text(path)
    digest = hashlib.sha256(raw).hexdigest()[:12]
    directory = Path(cache_dir or default_cache_dir()) / f"{path.stem}-{digest}"
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        tok = CharTokenizer.from_text(text)
        if tok.vocab_size > 65535:
            raise DataError(f"{path} has {tok.vocab_size} distinct characters; uint16 holds 65535")
        ids = np.array(tok.encode(text), dtype=np.uint16)
        n = int(0.9 * len(ids))
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / "train.bin", ids[:n].tobytes())
        _atomic_write(directory / "val.bin", ids[n:].tobytes())
        tok.save(directory / "vocab.json")
        meta = {
            "format": _FORMAT,
            "source": str(path),
            "sha256": digest,
            "train_tokens": n,
            "val_tokens": len(ids) - n,
            "vocab_size": tok.vocab_size,
        }
        _atomic_write(meta_path, json.dumps(meta, indent=1).encode())  # last: marks it complete
    tok = CharTokenizer.load(directory / "vocab.json")

    def mmap(name: str) -> np.ndarray:
        f = directory / name
        if f.stat().st_size == 0:
            return np.zeros(0, dtype=np.uint16)  # np.memmap refuses empty files
        return np.memmap(f, dtype=np.uint16, mode="r")

    return TextDataset(mmap("train.bin"), mmap("val.bin"), tok, directory)


__all__ = ["CharTokenizer", "DataError", "TextDataset", "DEFAULT_TEXT", "load_text_dataset"]
