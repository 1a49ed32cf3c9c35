"""Train the digits runs of ``configs/tables/digits_quality.yaml``, sweep their samplers, render the table.

    python experiments/digits_quality.py [--runs-root runs] [--iters 1000] [--batch-size 128]
        [--fid-samples 1000] [--num-test N] [--only NAME ...] [--dry-run]

One command for the CPU quality table of issue 14, in three stages, each a
subprocess of the project's own CLIs (one process at a time):

1. ``train.py`` for every family that samples, at an equal budget
   (``train.iters`` × ``train.batch_size``), into
   ``<runs-root>/digits_quality/<name>``; the discrete flows also get
   ``eval.fid.features=digits`` so their ``final.json`` holds FD/KID of
   ``--fid-samples`` samples (one network pass). A run whose ``final.json``
   is at ``--iters`` is skipped; a partial one resumes from its checkpoint.
2. ``cost_curve.py`` on every ODE/SDE run with the sampler grid of the table:
   Heun on the EDM (Karras, ρ = 7) grid at 5, 10, 25, 50 steps (9, 19, 49, 99
   NFE) and Euler on the uniform grid at 10, 20, 50, 100 steps; for the score
   models and INDM also Heun with the grid's σ_max at the data's diameter
   (``sigma_max=9``, :data:`DIGITS_DIAMETER`) beside EDM's 80; DiffFlow's SDE
   at 5, 10, 25, 50 steps (2 evaluations a step). FD/KID of ``--fid-samples``
   samples per setting with the offline digits features, one sample grid per
   setting, the FD-vs-NFE and bits/dim-vs-NFE panels. Its output folder is
   named by the digest of its settings, so a rerun with the same arguments
   reuses the folder and other settings' results are never overwritten.
3. ``tables.py configs/tables/digits_quality.yaml --runs-root <runs-root>``.

The table's caption describes the default sizes; smaller ``--iters`` /
``--fid-samples`` (smoke tests) render the same table from those runs.
``--dry-run`` prints the commands. Exit code: the first failing stage's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "configs" / "tables" / "digits_quality.yaml"
FOLDER = "digits_quality"  # the spec's rows read <runs-root>/digits_quality/*

# name -> (training config, cost-curve grid or None for a one-pass flow)
FEW_STEP = "sampler=heun:grid=karras:steps=5,10,25,50;sampler=euler:grid=uniform:steps=10,20,50,100"
# Score models (and INDM's latent score) start EDM's sampler at x̂ = σ_max z. Besides
# EDM's σ_max = 80 (the default), Heun on the Karras grid up to the data's diameter:
# DIGITS_DIAMETER, the largest distance between two training digits in [-1, 1] (9.04;
# INDM's latents of the trained run: 9.39), Song & Ermon's (2020) rule for σ_max.
DIGITS_DIAMETER = 9.0
SCORE_FEW_STEP = (
    f"sampler=heun:grid=karras:sigma_max={DIGITS_DIAMETER:g}:steps=5,10,25,50;" + FEW_STEP
)
RUNS: dict[str, tuple[str, str | None]] = {
    "score_vp": ("configs/score/vp_digits.yaml", SCORE_FEW_STEP),
    "score_ddpmpp_vp": ("configs/score/digits_ddpmpp_vp.yaml", SCORE_FEW_STEP),
    "otcfm": ("configs/fm/otcfm_digits.yaml", FEW_STEP),
    "rectified": ("configs/fm/rectified_digits.yaml", FEW_STEP),
    "indm": ("configs/indm/digits.yaml", SCORE_FEW_STEP),
    "diffflow": ("configs/diffflow/digits.yaml", "steps=5,10,25,50"),
    "realnvp": ("configs/flows/realnvp_digits.yaml", None),
    "glow": ("configs/flows/glow_digits.yaml", None),
    "nice": ("configs/flows/nice_digits.yaml", None),
    "resflow": ("configs/flows/resflow_digits.yaml", None),
}


# Per-run overrides beyond the shared budget. The score configs' EMA decay (0.998)
# is sized for longer runs: after 1000 iterations 0.998^1000 = 13.5% of the EMA
# copy is still the initial weights, and its probability-flow ODE diverges (sample
# std 2.45 against the data's 0.35 at 19 NFE) while the raw weights' does not.
# 0.99, the other digits families' decay, leaves 4e-5.
EXTRA: dict[str, list[str]] = {
    "score_vp": ["train.ema=0.99"],
    "score_ddpmpp_vp": ["train.ema=0.99"],
}


def finished_at(run_dir: Path) -> int | None:
    """The iteration count of ``run_dir/final.json``, or None."""
    try:
        return int(json.loads((run_dir / "final.json").read_text())["iterations"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(stage label, argv)`` of every subprocess, in order."""
    py = [sys.executable, "-u"]
    root = Path(args.runs_root)
    budget = [f"train.iters={args.iters}", f"train.batch_size={args.batch_size}"]
    if args.warmup_iters is not None:
        budget.append(f"train.warmup_iters={args.warmup_iters}")
    out: list[tuple[str, list[str]]] = []
    names = args.only or list(RUNS)
    for name in names:
        config, grid = RUNS[name]
        run_dir = root / FOLDER / name
        extra = (
            [] if grid else ["eval.fid.features=digits", f"eval.fid.num_samples={args.fid_samples}"]
        ) + EXTRA.get(name, [])
        if finished_at(run_dir) != args.iters:
            train = [str(REPO / "experiments" / "train.py"), "--config", str(REPO / config)]
            out.append((f"train {name}", py + train + budget + extra + [f"run.dir={run_dir}"]))
    for name in names:
        config, grid = RUNS[name]
        if grid is None:
            continue
        curve = [str(REPO / "experiments" / "cost_curve.py"), str(root / FOLDER / name)]
        curve += ["--grid", grid, "--fid", "digits", "--fid-samples", str(args.fid_samples)]
        curve += ["--num-samples", "0"]
        if args.num_test is not None:
            curve += ["--num-test", str(args.num_test)]
        out.append((f"cost curve {name}", py + curve))
    table = [str(REPO / "experiments" / "tables.py"), str(SPEC), "--runs-root", str(root)]
    out.append(("table", py + table))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs-root", default="runs", help="runs root of the table (default runs)")
    parser.add_argument("--iters", type=int, default=1000, help="training iterations of every run")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch of every run")
    parser.add_argument(
        "--warmup-iters", type=int, help="learning-rate warm-up (default: each config's)"
    )
    parser.add_argument("--fid-samples", type=int, default=1000, help="samples per FD/KID")
    parser.add_argument(
        "--num-test", type=int, help="cost curves: test images (default: the whole test split)"
    )
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="only these runs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args()
    for key in ("iters", "batch_size"):
        if getattr(args, key) < 1:
            print(f"error: --{key.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.fid_samples < 2:
        print("error: --fid-samples must be >= 2", file=sys.stderr)
        return 2
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    for label, argv in commands(args):
        shown = " ".join(shlex.quote(a) for a in argv[2:])
        print(f"== {label}: python {shown}", file=sys.stderr, flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        code = subprocess.call(argv, env=env)
        print(f"== {label}: exit {code}, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
