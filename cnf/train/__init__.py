"""Training: the loop (:mod:`cnf.train.loop`), atomic checkpoints, tracking, data parallelism.

Submodules import lazily, so the run folder (:mod:`cnf.rundir`) can use the
checkpoint files without importing the loop.
"""

from cnf.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["NonFiniteError", "Trainer", "load_checkpoint", "save_checkpoint"]


def __getattr__(name: str):  # noqa: ANN202
    if name in ("Trainer", "NonFiniteError"):
        from cnf.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
