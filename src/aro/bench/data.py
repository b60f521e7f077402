"""Byte-level text data: any file or folder, or the Python standard library's own source.

The embedded default corpus is every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``
(sorted, skipping ``site-packages``, ``dist-packages`` and test directories, which some
distributions strip), which every Python install carries: the benchmark needs no download. Its
size and SHA-256 go into each run's ``config.json``, since it differs between Python versions.

Text is read as bytes (vocabulary 256); a UTF-8 byte-order mark is dropped and CRLF line endings
become LF. The corpus is split deterministically into 200 equal blocks, every tenth block going
to validation (10%, spread over the whole corpus), and both splits are written once to a cache
folder and memory-mapped.

Batches are a pure function of ``(seed, step)``: every optimizer sees the same data in the same
order, and a resumed run continues with the batch it would have seen.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Corpus", "default_cache_dir", "load_corpus", "stdlib_files"]

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
_BLOCKS = 200
_VAL_EVERY = 10
_VAL_SEED = 1_000_003


def default_cache_dir() -> Path:
    return Path(os.environ.get("ARO_CACHE", Path.home() / ".cache" / "aro"))


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The ``*.py`` files of the standard library (or of ``root``), sorted, tests skipped."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    return [f for f in sorted(root.rglob("*.py")) if not _SKIP_DIRS & set(f.relative_to(root).parts[:-1]) and f.is_file()]


def _read_text_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.replace(b"\r\n", b"\n")


def _source_files(path: str | None) -> tuple[str, list[Path]]:
    if path is None:
        return "python-stdlib", stdlib_files()
    p = Path(path).expanduser()
    if p.is_file():
        return str(p.resolve()), [p]
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]
        files = [f for f in files if b"\x00" not in f.read_bytes()[:8192]]  # skip binaries
        if not files:
            raise ValueError(f"--data {path!r}: the folder holds no text files")
        return str(p.resolve()), files
    raise ValueError(f"--data {path!r}: no such file or folder")


@dataclass
class Corpus:
    """Train and validation byte arrays (memory-mapped) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str
    sha256: str
    n_files: int

    def describe(self) -> dict:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "files": self.n_files,
            "train_bytes": int(self.train.size),
            "val_bytes": int(self.val.size),
        }

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch number ``step`` of the data order of ``seed``."""
        return _sample(self.train, np.random.default_rng([seed, step]), batch_size, seq_len)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed validation set, the same for every seed and optimizer."""
        rng = np.random.default_rng(_VAL_SEED)
        return [_sample(self.val, rng, batch_size, seq_len) for _ in range(n_batches)]


def _sample(data: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data.size <= seq_len + 1:
        raise ValueError(f"corpus split of {data.size} bytes is too small for seq_len={seq_len}")
    starts = rng.integers(0, data.size - seq_len - 1, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(data[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def load_corpus(path: str | None = None, cache_dir: Path | None = None) -> Corpus:
    """Load (and on first use, build and cache) the corpus at ``path`` (None: Python stdlib)."""
    source, files = _source_files(path)
    if not files:
        raise ValueError("the corpus is empty")
    digest = hashlib.sha256()
    parts = []
    for f in files:
        text = _read_text_bytes(f)
        parts.append(text)
        digest.update(text)
        digest.update(b"\x00")
    sha = digest.hexdigest()
    folder = (cache_dir or default_cache_dir()) / "data" / sha[:16]
    train_path, val_path = folder / "train.bin", folder / "val.bin"
    if not (train_path.exists() and val_path.exists()):
        data = np.frombuffer(b"\n".join(parts), dtype=np.uint8)
        blocks = np.array_split(data, _BLOCKS)
        train = np.concatenate([b for i, b in enumerate(blocks) if i % _VAL_EVERY != _VAL_EVERY - 1])
        val = np.concatenate([b for i, b in enumerate(blocks) if i % _VAL_EVERY == _VAL_EVERY - 1])
        folder.mkdir(parents=True, exist_ok=True)
        for target, array in ((train_path, train), (val_path, val)):
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            array.tofile(tmp)
            os.replace(tmp, target)  # atomic: a killed build never leaves a half file
    train = np.memmap(train_path, dtype=np.uint8, mode="r")
    val = np.memmap(val_path, dtype=np.uint8, mode="r")
    return Corpus(train, val, source, sha, len(files))
