"""Training loop, run folders, checkpoints and tracking."""

from cnf.train.checkpoint import load_checkpoint, save_checkpoint
from cnf.train.loop import NonFiniteError, RunFolderError, Trainer, evaluate_split, prepare_run_dir

__all__ = [
    "NonFiniteError",
    "RunFolderError",
    "Trainer",
    "evaluate_split",
    "load_checkpoint",
    "prepare_run_dir",
    "save_checkpoint",
]
