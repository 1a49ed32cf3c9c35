"""FD (FID) and KID of a trained image model's samples against its training set.

    python experiments/fid.py RUN_DIR [--num-samples 50000] [--batch-size B] [--seed S]
        [--kid-subsets 100] [--kid-subset-size 1000] [--no-progress] [dotted.key=value ...]

The run config's ``eval.fid`` section says what to measure; ``eval.fid.*``
overrides change it (``eval.fid.features``, ``eval.fid.num_samples``,
``eval.fid.batch_size``, ``eval.fid.kid_subsets``, ``eval.fid.kid_subset_size``;
the options above override those). ``eval.fid.features=<digits|PATH>``
chooses the feature network: ``digits`` (the project's 8×8 digits classifier,
trained offline on first use; the default for data.name=digits) or the path
of a TorchScript network called as ``detector(uint8 images,
return_features=True)``, e.g. NVIDIA's ``inception-2015-12-05.pt`` for FID
proper. A missing or unusable file is one ``error:`` line (exit 2).

Sampling settings: other ``eval.*`` overrides change the run's settings as
for evaluate.py, and flat keys of the model's settings, as in a cost grid,
choose the sampler: ``sampler=heun steps=10 grid=karras`` (score, INDM, flow
matching), ``method=euler steps=20``, ``sampler=em steps=100`` ...

Samples come from ``run.model.sample`` in batches through
``cnf.quality.SampleQuality`` (the code behind ``final.json``'s and
``cost_curve.py``'s FD): one ``torch.Generator`` seeded with --seed on the
run's device (and the global RNG seeded too), so the same seed, batch size
and settings give the same samples. They are quantised to the data's grey
levels before the feature network sees them. The training set's reference
statistics are computed once and cached under ``$CNF_CACHE`` (default
``~/.cache/cnf``).

The last line of stdout is one JSON object: fid, kid, kid_stderr,
num_samples, features, feature_identity, iteration, seed, batch_size,
kid_subsets, kid_subset_size, sampling (the sampler settings), nfe_per_sample
(if the model reports NFE), finite_fraction, fid_data / kid_data /
kid_data_stderr / data_num_images (the held-out test images scored the same
way: the floor), reference (images, cache file), dataset, run_dir, seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import _cli

from cnf.config import ConfigError
from cnf.quality import SampleQuality
from cnf.rundir import load_run
from cnf.settings import describe


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument(
        "overrides", nargs="*", help="dotted.key=value (eval.fid.*, eval.*) or sampling settings"
    )
    parser.add_argument("--num-samples", type=int, help="default eval.fid.num_samples (50000)")
    parser.add_argument(
        "--batch-size", type=int, help="samples per batch (default eval.fid.batch_size)"
    )
    parser.add_argument("--seed", type=int, help="sampling seed (default eval.seed)")
    parser.add_argument("--kid-subsets", type=int, help="KID subsets (default 100)")
    parser.add_argument("--kid-subset-size", type=int, help="KID subset size (default 1000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args()  # overrides before or after the options
    _cli.setup_threads()
    minimum = {"num_samples": 2, "batch_size": 1, "kid_subsets": 1, "kid_subset_size": 2}
    for name, low in minimum.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    config_overrides, changes = _cli.split_overrides(args.overrides)
    t0 = time.perf_counter()
    run = load_run(args.run_dir, config_overrides)
    cfg, data, model = run.cfg, run.data, run.model
    if data.kind != "image":
        raise ConfigError(
            f"fid.py needs an image data set; {run.run_dir} has data.name={data.name}"
        )
    settings = model.with_settings(changes)
    spec = cfg.eval.fid.features or ("digits" if data.name == "digits" else None)
    if spec is None:
        raise ConfigError(
            f"data.name={data.name} needs eval.fid.features=<path of a TorchScript feature "
            "network, e.g. inception-2015-12-05.pt>"
        )
    seed = cfg.eval.seed if args.seed is None else args.seed
    quality = SampleQuality.for_eval(
        data,
        cfg.eval,
        device=model.device,
        progress=not args.no_progress,
        features=spec,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
    )
    config = quality.config
    res = quality.record(model, settings=settings, seed=seed)
    info = res["fid_info"]
    out = {
        "fid": res["fid"],
        "kid": res["kid"],
        "kid_stderr": res["kid_stderr"],
        "num_samples": config.num_samples,
        "features": info["features"],
        "feature_identity": info["feature_identity"],
        "iteration": run.iteration,
        "seed": seed,
        "batch_size": config.batch_size,
        "kid_subsets": config.kid_subsets,
        "kid_subset_size": config.kid_subset_size,
        "sampling": describe(settings),
        "nfe_per_sample": res["fid_nfe"],
        "finite_fraction": res["fid_finite_fraction"],
        "fid_data": res["fid_data"],
        "kid_data": res["kid_data"],
        "kid_data_stderr": res["kid_data_stderr"],
        "data_num_images": res["fid_data_num_images"],
        "reference": info["reference"],
        "dataset": data.name,
        "run_dir": str(run.run_dir),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
