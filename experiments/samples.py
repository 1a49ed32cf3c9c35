"""A PNG grid of an image model's samples, with the sampling settings and NFE in the title.

    python experiments/samples.py RUN_DIR --grid RxC --out FILE.png [--seed S] [dotted.key=value ...]

Draws R·C samples with a ``torch.Generator`` seeded with --seed (default
eval.seed) through ``run.model.sample``; overrides change the sampling
settings (``eval.solver.name=euler eval.solver.steps=10``, ``model.sampler=em``
...). Samples are shown at the data's grey levels (``cnf.quality.images``).
"""

from __future__ import annotations

import argparse
import re
import sys

import _cli
import torch
from fid import sampling_settings

from cnf.config import ConfigError
from cnf.cost import describe_setting
from cnf.quality import image_grid, samples_to_images
from cnf.rundir import load_run


def parse_grid(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(
            f"--grid must be ROWSxCOLS with positive numbers (e.g. 8x8), got '{text}'"
        )
    return int(m.group(1)), int(m.group(2))


#: Settings that change likelihoods only, never samples: left out of the title.
LIKELIHOOD_ONLY = ("divergence.", "logdet.", "nelbo_samples", "correction", "solver.adjoint")


def title(run, settings: dict, nfe: float | None) -> str:
    shown = {
        k.removeprefix("solver."): v
        for k, v in settings.items()
        if not k.startswith(LIKELIHOOD_ONLY) and not (k == "solver.max_steps" and not v)
    }
    cost = f"NFE {nfe:g}" if nfe is not None else "NFE n/a"
    return f"{run.run_dir.name} (iteration {run.iteration})\n{describe_setting(shown)} · {cost}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (eval.*, sampler keys)")
    parser.add_argument("--grid", default="8x8", help="ROWSxCOLS (default 8x8)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--seed", type=int, help="sampling seed (default eval.seed)")
    args = parser.parse_intermixed_args()  # overrides before or after the options
    _cli.setup_threads()
    rows, cols = parse_grid(args.grid)
    run = load_run(args.run_dir, args.overrides)
    data, model = run.data, run.model
    if data.kind != "image":
        raise ConfigError(
            f"samples.py needs an image data set; {run.run_dir} has data.name={data.name}"
        )
    seed = run.cfg.eval.seed if args.seed is None else args.seed
    n = rows * cols
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        gen = torch.Generator(device=model.device).manual_seed(seed)
        x, stats = model.sample(n, generator=gen)
    images = samples_to_images(x.reshape(n, *data.image_shape), data.num_levels)
    grid = image_grid(images, rows, cols, pad=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfe = stats.get("nfe")
    grey = grid.shape[-1] == 1
    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 12), max(3.0, h / 12) + 0.5), dpi=120)
    ax.imshow(grid[..., 0] if grey else grid, cmap="gray" if grey else None, vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title(run, sampling_settings(model), nfe), fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"{n} samples (NFE {nfe}) written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
