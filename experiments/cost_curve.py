"""Likelihood vs sampling cost for trained runs of any model family.

    python experiments/cost_curve.py RUN_DIR [RUN_DIR ...] [--grid GRID] [--out DIR]
        [--num-test N] [--num-samples N] [--seed S] [--batch-size B] [--device D]
        [--fid FEATURES] [--fid-samples N] [--image-grid RxC]

For every run and every cost setting of the grid: the test NLL (or NELBO, for
models that only bound the likelihood; the ``objective`` column says which)
with its standard error, mean NFE and wall time, and sample quality — MMD² to
held-out test data, the exact data log-density of the samples and the
fraction inside the support where the data density is known — with the
sampler's NFE and wall time. Common random numbers: every setting and every
model uses the same seed for probes (global RNG) and base noise (a seeded
torch.Generator).

GRID is a YAML file (a list of settings) or an inline spec; without --grid
each model uses its own ``default_cost_grid()`` (for score models, INDM and
flow matching it includes the few-step samplers: ``sampler=heun`` and
``sampler=euler`` with ``grid=karras|uniform``, e.g.
``--grid "sampler=heun:grid=karras:steps=5,10,25,50;sampler=euler:grid=uniform:steps=10,20,50,100"``).

Image runs also get, per setting, FD and KID of --fid-samples samples
(default --num-samples) against the training set through
``cnf.quality.SampleQuality`` (--fid: ``digits``, a TorchScript file or
``none``; default the run's ``eval.fid.features``, else ``digits`` on digits),
with the held-out test images' own FD/KID as the floor, and one sample grid
PNG per setting (--image-grid, default 8x8; ``none`` to skip), all drawn from
the same noise (common random numbers).

Writes to --out (default: RUN_DIR/cost_curve-<digest of the settings> for one
run, otherwise runs/cost_curve/<timestamp>-<digest>; a folder holding results
of other settings is never overwritten):
  provenance.json   the runs, grid, sizes and seed that made the results
  cost_curve.jsonl  one line per model x setting: run_dir, model, family,
                    dataset, iteration, setting (as given), settings (every
                    resolved setting), label, objective, nll/nelbo
                    (+ _stderr), objective_minus_ref (+ _stderr, paired vs the
                    model's most expensive setting), eval_nfe, eval_seconds,
                    sample_nfe, sample_seconds, sample_mmd2, mmd_kernel,
                    sample_data_logp, sample_support_fraction,
                    sample_finite_fraction, floor, gap (+ _stderr, paired),
                    entropy, num_points, batch_size, num_test,
                    num_samples, seed, units, eval_reused_from (the
                    setting whose identical evaluation was reused); image
                    runs: bpd (+ _stderr), fid, kid, kid_stderr,
                    fid_num_samples, fid_nfe, fid_finite_fraction,
                    fid_seconds, fid_data, kid_data (+ _stderr),
                    fid_data_num_images, fid_info (features, their identity,
                    sizes, seed, reference cache)
  cost_curve.png    objective (bits/dim for images) vs NFE and MMD² (FD for
                    images) vs NFE, one line per model and sampler
  cost_curve.md     the markdown table (also printed)
  samples/<model>/<setting>.png   image runs: one sample grid per setting
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import _cli
from reporting import cost_curve_markdown, plot_cost_curve, save_image_grid
from samples import parse_grid

from cnf.cost import (
    GRID_SYNTAX,
    CostGridError,
    check_cost_grid,
    cost_curve,
    describe_setting,
    load_cost_grid,
    normalize_cost_grid,
    typed_grid,
)
from cnf.evaluation import draw_samples
from cnf.quality import SampleQuality, samples_to_images
from cnf.rundir import LoadedRun, load_run
from cnf.train.checkpoint import atomic_write_text


def model_labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, with the parent prepended where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def settings_digest(provenance: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(provenance, sort_keys=True, default=str).encode()).hexdigest()[
        :8
    ]


def default_out(run_dirs: list[Path], digest: str) -> Path:
    """``RUN_DIR/cost_curve-<digest of the settings>`` for one run: another grid never overwrites it."""
    if len(run_dirs) == 1:
        return run_dirs[0] / f"cost_curve-{digest}"
    return Path("runs") / "cost_curve" / f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}"


def quality_for(run: LoadedRun, features: str | None, num_samples: int) -> SampleQuality | None:
    """FD/KID of an image run's samples (--fid), or None for other data or --fid none."""
    if run.data.kind != "image":
        return None
    spec = (
        features or run.cfg.eval.fid.features or ("digits" if run.data.name == "digits" else None)
    )
    if spec is None or spec == "none":
        return None
    if num_samples < 2:
        raise CostGridError(
            f"{run.run_dir}: FD/KID need --fid-samples >= 2 (or --fid none), got {num_samples}"
        )
    return SampleQuality.for_eval(
        run.data, run.cfg.eval, device=run.model.device, features=spec, num_samples=num_samples
    )


def file_stem(label: str) -> str:
    """A setting's label as a file name: ``heun grid=karras steps=5`` → ``heun_grid-karras_steps-5``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label.replace("=", "-")).strip("_") or "default"


def save_setting_grids(
    run: LoadedRun, label: str, grid: list, out: Path, shape: tuple[int, int], seed: int
) -> list[Path]:
    """One PNG of ``rows × cols`` samples per setting, from the same noise (``seed``) for all."""
    rows, cols = shape
    folder = out / "samples" / file_stem(label)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for setting, settings in zip(grid, typed_grid(run.model, grid)):
        x, nfe, _ = draw_samples(run.model, rows * cols, settings=settings, seed=seed)
        images = samples_to_images(x.reshape(len(x), *run.data.image_shape), run.data.num_levels)
        path = folder / f"{file_stem(describe_setting(setting))}.png"
        save_image_grid(
            images.numpy(),
            path,
            image_shape=run.data.image_shape,
            ncols=cols,
            nrows=rows,
            title=f"{label} (iteration {run.iteration}), seed {seed}\n"
            + f"{describe_setting(setting)} · NFE {'n/a' if nfe is None else f'{nfe:g}'}",
        )
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\n" + GRID_SYNTAX,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--grid", help="YAML file or inline spec (see below)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--num-test", type=int, help="test points for the NLL (default: all)")
    parser.add_argument(
        "--num-samples", type=int, default=2000, help="samples per setting (0: none; default 2000)"
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="common-random-numbers seed (default 1234)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="evaluation batch (default: eval.batch_size)"
    )
    parser.add_argument("--device", help="cpu | cuda | auto (default: the run's device)")
    parser.add_argument(
        "--fid",
        help="image runs: FD/KID features, digits | PATH | none "
        "(default: eval.fid.features, else digits on digits)",
    )
    parser.add_argument(
        "--fid-samples", type=int, help="samples per setting for FD/KID (default --num-samples)"
    )
    parser.add_argument(
        "--image-grid", default="8x8", help="image runs: sample grid per setting, RxC | none"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs, grid and output folder, and exit"
    )
    args = parser.parse_args()
    _cli.setup_threads()
    for name in ("num_test", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CostGridError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.num_samples < 0:
        raise CostGridError(f"--num-samples must be >= 0, got {args.num_samples}")
    fid_samples = args.num_samples if args.fid_samples is None else args.fid_samples
    image_grid = None if args.image_grid == "none" else parse_grid(args.image_grid)

    grid = load_cost_grid(args.grid) if args.grid is not None else None
    run_dirs = [Path(p) for p in args.run_dirs]
    labels = model_labels(run_dirs)
    provenance = {
        "runs": [str(p) for p in run_dirs],
        "grid": grid,
        "num_test": args.num_test,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "fid": args.fid,
        "fid_samples": fid_samples,
    }
    digest = settings_digest(provenance)
    out = Path(args.out) if args.out else default_out(run_dirs, digest)
    previous = out / "provenance.json"
    if previous.is_file() and json.loads(previous.read_text()).get("digest") != digest:
        raise CostGridError(
            f"--out {out} holds a cost curve made with other settings "
            f"(see {previous}); choose another --out"
        )
    if args.dry_run:
        print("runs:", *[str(p) for p in run_dirs], sep="\n  ")
        print("grid:", *(grid or ["(each model's default_cost_grid())"]), sep="\n  ")
        print(f"output: {out}")
        return 0

    runs = [load_run(p, device=args.device) for p in run_dirs]
    # Every run loads and accepts every setting, and its feature network
    # loads, before any expensive work starts.
    grids, qualities = [], []
    for run in runs:
        run_grid = grid if grid is not None else normalize_cost_grid(run.model.default_cost_grid())
        check_cost_grid(run.model, typed_grid(run.model, run_grid), run.data)
        grids.append(run_grid)
        qualities.append(quality_for(run, args.fid, fid_samples))
    records: list[dict[str, Any]] = []
    pngs: list[Path] = []
    for run, label, run_grid, quality in zip(runs, labels, grids, qualities):
        print(
            f"== {label} ({run.cfg.model.family}, {run.data.name}, iteration {run.iteration})",
            file=sys.stderr,
        )
        recs = cost_curve(
            run.model,
            run.data,
            grid=grid,
            num_test=args.num_test,
            num_samples=args.num_samples,
            batch_size=args.batch_size or run.cfg.eval.batch_size,
            seed=args.seed,
            check=False,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            quality=quality,
        )
        if run.data.kind == "image" and image_grid is not None:
            pngs += save_setting_grids(run, label, run_grid, out, image_grid, args.seed)
        info = {
            "run_dir": str(run.run_dir),
            "model": label,
            "family": run.cfg.model.family,
            "dataset": run.data.name,
            "iteration": run.iteration,
        }
        records += [{**info, **r} for r in recs]

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(previous, json.dumps({**provenance, "digest": digest}, indent=2) + "\n")
    atomic_write_text(out / "cost_curve.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    table = cost_curve_markdown(records)
    atomic_write_text(out / "cost_curve.md", table)
    plot_cost_curve(records, out / "cost_curve.png")
    print(table)
    print(f"written to {out}/cost_curve.{{jsonl,md,png}}")
    if pngs:
        print(f"sample grids ({len(pngs)}) in {out}/samples/")
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
