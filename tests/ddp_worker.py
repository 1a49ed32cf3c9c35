"""Test helper for tests/test_ddp.py: train, then save every rank's model state.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py \
        --config CONFIG --out DIR [dotted.key=value ...]

The training is :class:`cnf.train.loop.Trainer`'s, as in ``experiments/train.py``
(rank 0 writes ``run.dir``); afterwards each rank writes the state dict it holds
to ``DIR/rank<r>.pt``, so a test can check that the ranks trained one model, and
``DIR/rank<r>.json``: the type of its training-step module, its plateau counters
and the learning rate it ended with.
Without ``torchrun`` it is a single-process run and writes ``DIR/rank0.pt``.
No evaluation runs: the test compares the training, not the test NLL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cnf.config import load_config  # noqa: E402
from cnf.train import distributed  # noqa: E402
from cnf.train.loop import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    cfg = load_config(args.config, args.overrides)
    info = distributed.init(cfg.device)
    try:
        trainer = Trainer(
            cfg, rank=info.rank, world_size=info.world_size, log=lambda _m: None, progress=False
        )
        distributed.barrier()
        trainer.prepare()
        assert trainer.train() == "finished"
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer.model.state_dict(), args.out / f"rank{info.rank}.pt")
        record = {
            "step_module": type(trainer.step_module).__name__,
            "plateau": trainer.plateau.state_dict(),
            "lr": trainer.scheduler.get_last_lr()[0],
            "iteration": trainer.iteration,
        }
        (args.out / f"rank{info.rank}.json").write_text(json.dumps(record))
        distributed.barrier()
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
