"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half;
and the lock that keeps two processes from training one run folder at once."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["RunFolderBusy", "atomic_save", "atomic_write_text", "run_lock"]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock."""


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs; ``RunFolderBusy`` if another process holds it.

    Two processes training one run would interleave their checkpoints and metric lines, and
    each would remove the other's temporary files. The lock is an advisory ``flock`` on
    ``run_dir/.lock``: the kernel releases it when its process dies, so a killed run leaves no
    stale lock to clear by hand. Where ``fcntl`` does not exist (Windows) runs are not locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms this project tests
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise RunFolderBusy(
                f"{run_dir} is being trained by another process (pid {holder}); two processes on one run would "
                "corrupt it: give concurrent invocations different --optimizers, or use --jobs") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
