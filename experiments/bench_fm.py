"""Few-step sample quality of trained flow-matching (or any) runs, as in the torchcfm baseline.

    python experiments/bench_fm.py RUN_DIR [RUN_DIR ...] [--settings euler:5,euler:10,dopri5:1e-5]
        [--num-samples 10000] [--seed 1234] [--json OUT]

For every run and setting: unbiased MMD² (RBF kernels of std 0.1, 0.5, 1, 2
summed — :func:`cnf.metrics.mmd2_rbf`, the definition of the torchcfm
baseline in docs/published-numbers.md) between ``--num-samples``
model samples and as many held-out data points, with the sampler's NFE. The
held-out points of toy data are drawn from the generator with a fixed seed
that neither training (per-iteration seeds) nor the test set uses; other
data use the (dequantised) test set. The test NLL is the run's ``final.json``
value (exact trace, the run's eval solver). Two data samples of the same
size score about 0 (printed as ``data vs data``), so differences below a few
1e-4 are noise.

Settings: ``METHOD:STEPS`` for fixed-step solvers (``euler:5``,
``midpoint:10``, ``rk4:4``) and ``METHOD:TOL`` for adaptive ones
(``dopri5:1e-5``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _cli  # noqa: E402  (puts the repo on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnf.data import Dataset  # noqa: E402
from cnf.data.toy import TOY_DATASETS  # noqa: E402
from cnf.metrics import mmd2_rbf  # noqa: E402
from cnf.rundir import load_run  # noqa: E402
from cnf.solve import ADAPTIVE_METHODS  # noqa: E402


def parse_settings(text: str) -> list[dict]:
    out = []
    for item in text.split(","):
        method, _, value = item.strip().partition(":")
        if not value:
            _cli.fail(f"setting '{item}' is not METHOD:STEPS or METHOD:TOL")
        if method in ADAPTIVE_METHODS:
            out.append({"method": method, "rtol": float(value), "atol": float(value)})
        else:
            out.append({"method": method, "steps": int(value)})
    return out


def label(setting: dict) -> str:
    if "steps" in setting:
        return f"{setting['method']} {setting['steps']}"
    return f"{setting['method']} {setting['rtol']:g}"


def reference(data: Dataset, n: int) -> np.ndarray:
    """Held-out data for the MMD²: fresh toy samples (fixed seed), else the test set."""
    if data.name in TOY_DATASETS:
        rng = np.random.default_rng([zlib.crc32(data.name.encode()), zlib.crc32(b"mmd-reference")])
        return TOY_DATASETS[data.name](rng, n)
    x = data.test[:n]
    if data.eval_transform is not None:
        x = data.eval_transform(x, np.random.default_rng(0))
    return x.reshape(len(x), -1)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--settings", default="euler:5,euler:10,midpoint:5,dopri5:1e-5")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings = parse_settings(args.settings)
    rows = []
    for run_dir in args.run_dirs:
        run = load_run(run_dir)
        ref = torch.as_tensor(reference(run.data, args.num_samples))
        final = run.final or {}
        row = {
            "run": str(run_dir),
            "iterations": run.iteration,
            "train_seconds": final.get("train_seconds"),
            "test_nll": final.get("test_nll"),
            "test_nll_stderr": final.get("test_nll_stderr"),
            "test_nfe": final.get("test_nfe"),
            "settings": {},
        }
        for setting in settings:
            gen = torch.Generator().manual_seed(args.seed)
            t0 = time.perf_counter()
            samples, stats = run.model.sample(
                args.num_samples, run.model.with_settings(setting), generator=gen
            )
            seconds = time.perf_counter() - t0
            flat = samples.detach().double().cpu().reshape(args.num_samples, -1)
            row["settings"][label(setting)] = {
                "mmd2": mmd2_rbf(flat, ref),
                "nfe": stats.get("nfe"),
                "seconds": seconds,
            }
        rows.append(row)
        print(json.dumps(row), flush=True)

    if rows:
        data = load_run(args.run_dirs[0]).data
        a = torch.as_tensor(reference(data, args.num_samples))
        if data.name in TOY_DATASETS:
            b = torch.as_tensor(
                TOY_DATASETS[data.name](np.random.default_rng(99), args.num_samples)
            )
            print(
                f"\ndata vs data (two {args.num_samples}-point samples): MMD² {mmd2_rbf(a, b):.5f}"
            )
    labels = [label(s) for s in settings]
    print(
        f"\nMMD² ({args.num_samples} samples vs {args.num_samples} held-out points; NFE in brackets)"
    )
    print("| run | iters | train s | test NLL (nats) | " + " | ".join(labels) + " |")
    print("|---|---|---|---|" + "---|" * len(labels))
    for r in rows:
        nll = (
            f"{r['test_nll']:.3f} ± {r['test_nll_stderr']:.3f}"
            if r["test_nll"] is not None
            else "-"
        )
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "-"
        cells = [f"{r['settings'][lb]['mmd2']:.4f} ({r['settings'][lb]['nfe']})" for lb in labels]
        print(f"| {r['run']} | {r['iterations']} | {secs} | {nll} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
