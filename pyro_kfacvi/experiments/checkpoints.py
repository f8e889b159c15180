"""Run folders on disk: file names, atomic writes and reading checkpoints back."""
import os
from pathlib import Path

import torch

__all__ = ["CHECKPOINT", "CURVES", "METRICS", "CheckpointError", "atomic_write", "load_checkpoint"]

CHECKPOINT, METRICS, CURVES = "checkpoint.pt", "metrics.json", "curves.png"


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or belongs to a different run."""


def atomic_write(path, write) -> None:
    """``write(file)`` into a temporary file next to ``path``, flush, fsync, then rename over it:
    a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read ``checkpoint.pt`` (or the checkpoint inside a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # EOFError, UnpicklingError, RuntimeError (zip archive), ...
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or corrupt: {type(exc).__name__}: {exc}). Checkpoints are "
            "replaced atomically, so it was damaged after it was written; restore it or start the run again") from exc
