"""A PNG grid of an image model's samples, with the sampling settings and NFE in the title.

    python experiments/samples.py RUN_DIR --grid RxC --out FILE.png [--seed S] [dotted.key=value ...]

Draws R·C samples with a ``torch.Generator`` seeded with --seed (default
eval.seed) through ``run.model.sample``. Overrides change the sampling
settings: ``eval.*`` config keys (``eval.solver.name=euler
eval.solver.steps=10``) or flat keys of the model's settings as in a cost
grid (``sampler=heun steps=10 grid=karras``, ``method=rk4 steps=8``,
``sampler=em steps=100``). Samples are shown at the data's grey levels
(``cnf.quality.images``).
"""

from __future__ import annotations

import argparse
import re
import sys

import _cli
from reporting import save_image_grid

from cnf.config import ConfigError
from cnf.cost import describe_setting
from cnf.evaluation import draw_samples
from cnf.quality import samples_to_images
from cnf.rundir import load_run
from cnf.settings import describe


def parse_grid(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(
            f"--grid must be ROWSxCOLS with positive numbers (e.g. 8x8), got '{text}'"
        )
    return int(m.group(1)), int(m.group(2))


#: Settings that change likelihoods only, never samples: left out of the title.
LIKELIHOOD_ONLY = ("divergence.", "logdet.", "nelbo_samples", "correction", "solver.adjoint")


def settings_title(settings: dict, nfe: float | None) -> str:
    """``"<sampling settings> · NFE n"``: what made a grid of samples.

    The solver's keys are left out when a sampler other than the solver
    (``ode``) draws the samples; they lose their ``solver.`` prefix unless a
    top-level key has the same name.
    """
    kept = {
        k: v
        for k, v in settings.items()
        if not k.startswith(LIKELIHOOD_ONLY)
        and not (k == "solver.max_steps" and not v)
        and not (k.startswith("solver.") and settings.get("sampler", "ode") != "ode")
    }
    shown = {}
    for k, v in kept.items():
        short = k.removeprefix("solver.")
        shown[short if short == k or short not in kept else k] = v
    cost = f"NFE {nfe:g}" if nfe is not None else "NFE n/a"
    return f"{describe_setting(shown)} · {cost}"


def title(run, settings: dict, nfe: float | None) -> str:
    return f"{run.run_dir.name} (iteration {run.iteration})\n{settings_title(settings, nfe)}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument(
        "overrides", nargs="*", help="dotted.key=value (eval.*) or sampling settings (sampler=heun)"
    )
    parser.add_argument("--grid", default="8x8", help="ROWSxCOLS (default 8x8)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--seed", type=int, help="sampling seed (default eval.seed)")
    args = parser.parse_intermixed_args()  # overrides before or after the options
    _cli.setup_threads()
    rows, cols = parse_grid(args.grid)
    config_overrides, changes = _cli.split_overrides(args.overrides)
    run = load_run(args.run_dir, config_overrides)
    data, model = run.data, run.model
    if data.kind != "image":
        raise ConfigError(
            f"samples.py needs an image data set; {run.run_dir} has data.name={data.name}"
        )
    settings = model.with_settings(changes)
    seed = run.cfg.eval.seed if args.seed is None else args.seed
    n = rows * cols
    x, nfe, _ = draw_samples(model, n, settings=settings, seed=seed)
    images = samples_to_images(x.reshape(n, *data.image_shape), data.num_levels)
    save_image_grid(
        images.numpy(),
        args.out,
        image_shape=data.image_shape,
        ncols=cols,
        nrows=rows,
        title=title(run, describe(settings), nfe),
    )
    print(f"{n} samples (NFE {nfe}) written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
