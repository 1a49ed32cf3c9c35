"""Reflow, stage 1 → 2: draw (sample, noise) pairs from a trained flow-matching run.

    python experiments/reflow.py RUN_DIR [--num-pairs 100000] [--out RUN_DIR/reflow_pairs.pt]
        [--method dopri5 --tol 1e-5 | --method euler --steps 100] [--seed 0]

Each pair is ``(x0, x1)`` with ``x1 ~ N(0, I)`` and ``x0`` the run's model
integrated from ``x1`` at t = 1 to t = 0 (its sampler, with an accurate
solver: reflow inherits the solver's error). The second stage retrains on
these pairs, usually starting from the first model's weights (Liu et al.,
"Flow straight and fast", ICLR 2023)::

    python experiments/train.py --config configs/fm/rectified_toy.yaml \\
        model.reflow_pairs=RUN_DIR/reflow_pairs.pt model.init_from=RUN_DIR \\
        run.dir=runs/fm_reflow2

The test NLL and samples of the second stage are scored on the real test
data as usual; only the training pairs change.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _cli
import torch

from cnf.diffusion.flow_matching import save_pairs
from cnf.models.fm import FlowMatchingModel
from cnf.rundir import load_run


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir")
    p.add_argument("--num-pairs", type=int, default=100_000)
    p.add_argument("--out", help="default: RUN_DIR/reflow_pairs.pt")
    p.add_argument("--method", default="dopri5")
    p.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of adaptive methods")
    p.add_argument("--steps", type=int, default=0, help="steps of fixed-step methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=10_000)
    args = p.parse_args()
    _cli.setup_threads()
    run = load_run(args.run_dir)
    if not isinstance(run.model, FlowMatchingModel):
        _cli.fail(f"{args.run_dir} is a '{run.cfg.model.family}' run; reflow needs family fm")
    if args.num_pairs < 1:
        _cli.fail("--num-pairs must be >= 1")
    cost = {"method": args.method}
    if args.steps:
        cost["steps"] = args.steps
    else:
        cost.update(rtol=args.tol, atol=args.tol)
    gen = torch.Generator(device=run.model.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    try:
        settings = run.model.with_settings(cost)
        x0, x1, stats = run.model.reflow_pairs(
            args.num_pairs, settings, generator=gen, batch_size=args.batch_size
        )
    except ValueError as e:
        _cli.fail(str(e).splitlines()[0])
    out = Path(args.out) if args.out else run.run_dir / "reflow_pairs.pt"
    save_pairs(
        out, x0, x1, source=str(run.run_dir), iteration=run.iteration, cost=cost, seed=args.seed
    )
    print(
        f"wrote {args.num_pairs} pairs to {out} in {time.perf_counter() - t0:.1f} s "
        f"(NFE {stats['nfe']:.0f} per solve, {cost})"
    )
    print(f"next: model.reflow_pairs={out} model.init_from={run.run_dir}")
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
