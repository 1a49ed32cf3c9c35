"""Atomic checkpoints that embed the resolved config; loaded with ``weights_only=True``.

A checkpoint is written to a temporary file in the same folder, flushed and
fsynced, then moved over the old one with ``os.replace`` (atomic on POSIX), and
the folder is fsynced. A process killed mid-write leaves the previous
checkpoint intact and at most a stray ``*.tmp`` file, which the next save
replaces.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: str | Path, write: Any) -> None:
    """Write a file atomically: ``write(fh)`` fills a temp file that then replaces ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, state dicts, plain Python values) atomically."""
    atomic_write_bytes(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no arbitrary unpickling)."""
    return torch.load(path, map_location=map_location, weights_only=True)
