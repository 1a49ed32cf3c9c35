"""Benchmark a tabular config on a synthetic MINIBOONE archive of the real size: s/iteration and NFE.

    OMP_NUM_THREADS=1 python experiments/bench_tabular.py [--iters 200] [--config configs/ffjord/miniboone.yaml]

Writes ``miniboone/data.npy`` of ``--rows`` × 43 (default 36 488, the real
archive's size: 29 556 / 3 284 / 3 648 rows after MAF's split) into a
temporary archive root, then trains the config for ``--iters`` iterations
through the normal training loop (its validation every 200 iterations
included; it is not counted in the training seconds) on one thread and
prints seconds per iteration over iterations 1–N (and over the first and last
50), forward and backward NFE at the start and the end, and the original
FFJORD code's POWER figure for comparison (``shared/reference/paper-numbers.md``).
``--test`` also runs the final test evaluation (exact trace: slow). Extra
arguments are config overrides, e.g. ``device=cuda``.

The synthetic rows are correlated, skewed and of mixed scales like the real
features (their values do not matter for the timing of the first iterations
beyond that); standardisation makes them unit-scale, as the loader does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _cli  # noqa: E402,F401  (puts the repo on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnf.config import load_config  # noqa: E402
from cnf.train.loop import Trainer  # noqa: E402

MINIBOONE_ROWS = 36488
ORIGINAL_POWER = "original FFJORD code, POWER paper model on random 6-d data: ~10.9 s/iteration, NFE 160 forward / ~214 backward (paper-numbers.md)"


def synthetic_miniboone(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 43)`` rows: 6 latent factors, heavy-tailed noise, a third of the columns
    exponentiated (skewed), scales from 1e-2 to 1e3."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, 6)) @ rng.uniform(-1, 1, (6, 43))
    x = factors + 0.3 * rng.standard_t(5, (n, 43))
    skew = np.arange(43) % 3 == 0
    x[:, skew] = np.exp(0.4 * x[:, skew])
    return x * np.logspace(-2, 3, 43)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/ffjord/miniboone.yaml")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rows", type=int, default=MINIBOONE_ROWS)
    parser.add_argument("--test", action="store_true", help="also evaluate the test NLL")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args()
    _cli.setup_threads()
    root = Path(tempfile.mkdtemp(prefix="bench_tabular_"))
    try:
        (root / "miniboone").mkdir()
        np.save(root / "miniboone" / "data.npy", synthetic_miniboone(args.rows))
        cfg = load_config(
            args.config,
            [
                "data.name=miniboone",
                f"data.path={root}",
                f"train.iters={args.iters}",
                "train.log_every=1",
                f"train.ckpt_every={args.iters + 1}",
                "train.ckpt_minutes=0",
                "eval.num_samples=0",
                "eval.plots=false",
                "track.wandb=disabled",
                *args.overrides,
                f"run.dir={root / 'run'}",
            ],
        )
        trainer = Trainer(cfg, progress=False, log=lambda _m: None)
        trainer.prepare()
        print(
            f"{args.config}: {trainer.data.name} {len(trainer.data.train)} train rows x "
            f"{trainer.data.dim}, batch {cfg.train.batch_size}, {torch.get_num_threads()} "
            f"thread(s), {trainer.device}"
        )
        trainer.train()
        lines = (root / "run" / "metrics.jsonl").read_text().splitlines()
        recs = [r for r in map(json.loads, lines) if "loss" in r]
        secs = [r["sec_per_iter"] for r in recs]
        head, tail = secs[:50], secs[-50:]
        print(
            f"s/iteration: {trainer.train_seconds / trainer.iteration:.3f} over 1-{trainer.iteration} "
            f"({np.mean(head):.3f} over the first {len(head)}, {np.mean(tail):.3f} over the last {len(tail)})"
        )
        for which, r in (("first", recs[0]), ("last", recs[-1])):
            print(
                f"NFE at iteration {r['iter']} ({which}): forward {r.get('nfe_forward')}, "
                f"backward {r.get('nfe_backward')}; loss {r['loss']:.3f}"
            )
        nfe_f = [r["nfe_forward"] for r in recs if "nfe_forward" in r]
        if nfe_f:
            print(f"mean NFE forward over 1-{trainer.iteration}: {np.mean(nfe_f):.1f}")
        print(ORIGINAL_POWER)
        if args.test:
            final = trainer.final_metrics()
            print(f"test NLL {final['test_nll']:.3f} (NFE {final.get('test_nfe')})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
